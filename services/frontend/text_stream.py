"""Worker token events -> client chunks: incremental detokenization, stop strings and usage.

    TokenEvent ─► no stop strings: detokenize all its tokens at once ─► Chunk(token_ids, text)
               └► stop strings:    per token: detokenize ─► stop-string matcher ─► Chunk(token_ids, released text)
    FinishEvent ─► flush held text ─► Chunk (if any) ─► Finish(reason, usage)

A TokenEvent holds the tokens of one worker message: one decode step's, or all that queued while the
stream was behind (the decode worker merges them). Without stop strings its text comes from one
detokenizer call, the same text as token by token; stop strings need the token that completes a match,
so they keep the per-token path. A stop string ends the request on the token that completes it; that
token is counted in usage and returned in token_ids, the matched text is not returned. Stop strings
count only once `min_tokens` tokens exist (as in vLLM).

The stream keeps when detokenization first and last ran and how long it took in all, so the frontend
records ONE `detokenize` span per request (never a span per token).
"""

from __future__ import annotations

import time

from common.engine.sampling_params import SamplingParams
from services.frontend.convert import Chunk, Finish
from services.frontend.detokenizer import IncrementalDetokenizer, Tokenizer
from services.frontend.relay import FinishEvent, TokenEvent
from services.frontend.stop_strings import StopStringMatcher


class TextStream:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        stop: list[str],
    ):
        self._detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids)
        self._matcher = StopStringMatcher(stop)
        self._min_tokens = sampling.min_tokens
        self._num_prompt_tokens = len(prompt_token_ids)
        self.num_completion_tokens = 0
        self.detokenize_started_ns: int | None = None  # wall clock of the first on_tokens/on_finish
        self.detokenize_ended_ns: int | None = None  # ... and of the end of the last one
        self.detokenize_busy_ns = 0  # time spent inside them

    def on_tokens(self, event: TokenEvent) -> tuple[Chunk, Finish | None]:
        """The chunk for these tokens, and a Finish when a stop string completed among them."""
        started_ns = self._start_timing()
        if self._matcher.has_stop_strings:
            result = self._on_tokens_one_by_one(event)
        else:
            self.num_completion_tokens += len(event.token_ids)
            result = Chunk(event.token_ids, self._detokenizer.add_tokens(event.token_ids), event.logprobs), None
        self._end_timing(started_ns)
        return result

    def on_finish(self, event: FinishEvent) -> tuple[Chunk | None, Finish]:
        """Flushes held text; the held text itself may still complete a stop string."""
        started_ns = self._start_timing()
        result = self._on_finish(event)
        self._end_timing(started_ns)
        return result

    def _start_timing(self) -> int:
        started_ns = time.time_ns()
        if self.detokenize_started_ns is None:
            self.detokenize_started_ns = started_ns
        return started_ns

    def _end_timing(self, started_ns: int) -> None:
        self.detokenize_ended_ns = time.time_ns()
        self.detokenize_busy_ns += self.detokenize_ended_ns - started_ns

    def _on_tokens_one_by_one(self, event: TokenEvent) -> tuple[Chunk, Finish | None]:
        token_ids: list[int] = []
        pieces: list[str] = []
        for token_id in event.token_ids:
            self.num_completion_tokens += 1
            token_ids.append(token_id)
            text = self._detokenizer.add_tokens([token_id])
            pieces.append(text if self.num_completion_tokens < self._min_tokens else self._matcher.feed(text))
            if self._matcher.matched is not None:
                break
        logprobs = event.logprobs[: len(token_ids)] if event.logprobs else None
        chunk = Chunk(token_ids, "".join(pieces), logprobs)
        if self._matcher.matched is None:
            return chunk, None
        return chunk, self._finish("stop", matched_stop=self._matcher.matched)

    def _on_finish(self, event: FinishEvent) -> tuple[Chunk | None, Finish]:
        tail = self._detokenizer.flush()
        if self.num_completion_tokens >= self._min_tokens:
            text = self._matcher.feed(tail)
            if self._matcher.matched is not None:
                chunk = Chunk([], text) if text else None
                return chunk, self._finish("stop", matched_stop=self._matcher.matched)
            text += self._matcher.flush()
        else:
            text = tail
        chunk = Chunk([], text) if text else None
        return chunk, self._finish(event.finish_reason, matched_stop_token_id=event.matched_stop_token_id)

    def _finish(self, reason: str, matched_stop: str | None = None, matched_stop_token_id: int | None = None) -> Finish:
        return Finish(reason, self._num_prompt_tokens, self.num_completion_tokens, matched_stop, matched_stop_token_id)
