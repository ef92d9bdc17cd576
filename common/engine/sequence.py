"""Per-request state: tokens so far, where its KV lives, and how far the model has computed it.

    token_ids:  [ prompt tokens ............ | output tokens ...... ]
                 0 .. num_prompt_tokens-1     .. num_tokens-1
    KV written for positions 0 .. num_computed_tokens-1; the rest is computed by the next step(s).

A resumed request (moved to other workers mid-stream) is sent its earlier outputs at the end of its
prompt: they count as prompt for positions and KV, and as outputs for sampling and stopping.

    token_ids:  [ prompt tokens ... | earlier outputs | output tokens ... ]
                 <------- num_prompt_tokens -------->
                                    <------------ num_output_tokens ------------>
                                    (num_output_tokens_before)

While decoding, num_computed_tokens == num_tokens - 1: the newest token is fed to the next step,
which writes its KV and samples the token after it. Preemption resets num_computed_tokens to 0 and
drops the block table, so the request later re-prefills prompt + output tokens in one go.

With prefix caching, `block_hashes` holds the chained hashes (common/kv/block_hash.py) of its full
blocks, computed as their tokens become known; the first `num_cached_blocks` entries of `block_table`
are in the prefix cache (found there at the start, or registered once their KV was computed).

With asynchronous scheduling the next decode step is launched before the current one's tokens reach
the host: a launched step appends PLACEHOLDER_TOKEN_ID, which the step's result overwrites (the next
step reads the real token on the device). At most the newest two tokens are placeholders:

    token_ids:  [ ... known tokens ... | step N (in flight) | step N+1 (in flight) ]
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from common.engine.sampling_params import SamplingParams
from common.kv.block_count import num_blocks_for

PLACEHOLDER_TOKEN_ID = -1  # a token sampled by a step still in flight (never a vocabulary id)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re-)prefill
    RUNNING = "running"  # prefilled; decoding one token per step
    FINISHED = "finished"  # done; blocks freed (or held for a KV hand-off)


@dataclass
class TokenLogprobs:
    """Raw model log-probabilities (before penalties/temperature/top-k/top-p), as vLLM returns."""

    token_id: int  # the sampled token
    logprob: float  # its log-probability
    top_token_ids: list[int]  # the n most likely tokens, most likely first
    top_logprobs: list[float]  # their log-probabilities


class Sequence:
    """One request's state; the scheduler and engine move it between queues."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        is_prefill_only: bool = False,
    ):
        self.request_id = request_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(self.token_ids)  # as sent: a resumed request's earlier outputs too
        self.num_output_tokens_before = sampling_params.num_output_tokens_before
        if self.num_output_tokens_before >= self.num_prompt_tokens:
            raise ValueError(f"num_output_tokens_before must be < the {self.num_prompt_tokens} prompt tokens "
                             f"that end with them, got {self.num_output_tokens_before}")
        self.sampling_params = sampling_params
        self.block_table: list[int] = []  # KV block ids, in position order
        self.num_computed_tokens = 0  # tokens whose KV is in `block_table`
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" once finished
        self.output_logprobs: list[TokenLogprobs] = []
        self.is_prefill_only = is_prefill_only  # prefill worker: stop after token #1, keep the KV
        self.is_prompt_counted = False  # prompt tokens counted in the engine's stats once
        self.block_hashes: list[bytes] = []  # hashes of its full blocks so far, in position order
        self.num_cached_blocks = 0  # leading entries of block_table that are in the prefix cache

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far (a resumed request's earlier outputs included): the next output index."""
        return self.num_output_tokens_at(len(self.token_ids))

    def num_output_tokens_at(self, num_tokens: int) -> int:
        """Output tokens among the first `num_tokens` tokens (earlier outputs of a resumed request included)."""
        return num_tokens - self.num_prompt_tokens + self.num_output_tokens_before

    @property
    def prompt_token_ids(self) -> list[int]:
        """The request's own prompt (without a resumed request's earlier outputs), for penalties."""
        return self.token_ids[: self.num_prompt_tokens - self.num_output_tokens_before]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens - self.num_output_tokens_before :]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def num_blocks_needed(self, num_tokens: int, block_size: int) -> int:
        """Extra blocks needed so that the block table covers `num_tokens` positions."""
        return max(0, num_blocks_for(num_tokens, block_size) - len(self.block_table))

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )


def needs_host_tokens(seq: Sequence) -> bool:
    """Whether sampling `seq`'s next token reads or returns more than the token id on the device:
    logprobs, penalties (they read the host's token lists), or a prefill-only sequence (it hands its KV
    off after token #1). A step with such a row waits for its tokens instead of being launched ahead."""
    params = seq.sampling_params
    return seq.is_prefill_only or params.logprobs is not None or params.has_penalties


def check_finish(
    seq: Sequence, eos_token_ids: frozenset[int], max_model_len: int, num_tokens: int | None = None
) -> str | None:
    """Why `seq` should stop after its token at `num_tokens - 1` (default: its newest) ("stop" /
    "length"), or None to go on. Tokens past that one, if any, are still in flight."""
    params = seq.sampling_params
    num_tokens = seq.num_tokens if num_tokens is None else num_tokens
    num_output = seq.num_output_tokens_at(num_tokens)
    if num_output >= params.min_tokens:
        token_id = seq.token_ids[num_tokens - 1]
        if token_id in params.stop_token_ids:
            return "stop"
        if not params.ignore_eos and token_id in eos_token_ids:
            return "stop"
    if num_output >= params.max_tokens or num_tokens >= max_model_len:
        return "length"
    return None
