"""The frontend's Chunk / Finish outputs -> OpenAI response bodies and stream chunks (the HTTP API's
`to_json` edge).

One `ResponseBuilder` serves one HTTP request. It is fed every choice's outputs in arrival order:

    on_chunk(index, Chunk)      -> stream chunks   (chat: a role chunk first for each choice)
    on_final(index, Finish)     -> stream chunk with finish_reason
    usage_chunk() / response()  -> the include_usage chunk / the non-streamed body

and keeps each choice's text, logprobs and usage for `response()`. Usage counts every prompt once
(not once per choice) and sums the completion tokens of all choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.engine.sequence import TokenLogprobs
from services.frontend.convert import Chunk, Finish


class TokenTexts:
    """Token id -> its text as logprobs show it (decoded alone; cached, the vocabulary is finite)."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tokenizer.decode([token_id])
        return text


@dataclass
class _Choice:
    prompt_index: int
    texts: list[str] = field(default_factory=list)
    chat_logprobs: list[dict] = field(default_factory=list)  # chat: one entry per token
    completion_logprobs: dict[str, list] = field(default_factory=lambda: {
        "tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
    num_text_chars: int = 0  # for completion logprobs' text_offset
    is_started: bool = False  # chat stream: role chunk sent
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0


class ResponseBuilder:
    def __init__(self, is_chat: bool, response_id: str, model: str, created: int, token_texts: TokenTexts,
                 prompt_indices: list[int], is_logprobs: bool, include_usage: bool = False):
        self.is_chat = is_chat
        self.response_id, self.model, self.created = response_id, model, created
        self._token_texts = token_texts
        self._choices = [_Choice(prompt_index) for prompt_index in prompt_indices]
        self._is_logprobs = is_logprobs
        self._include_usage = include_usage  # stream: every chunk has "usage": null, then a usage chunk
        # vLLM's continuous_usage_stats: prompt tokens by prompt index; every chunk then carries its
        # choice's usage so far instead of null
        self.continuous_prompt_tokens: dict[int, int] | None = None

    # ---- logprobs -------------------------------------------------------------------------------
    def _chat_logprob(self, logprobs: TokenLogprobs) -> dict:
        def entry(token_id: int, logprob: float) -> dict:
            text = self._token_texts(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {**entry(logprobs.token_id, logprobs.logprob),
                "top_logprobs": [entry(token_id, logprob)
                                 for token_id, logprob in zip(logprobs.top_token_ids, logprobs.top_logprobs)]}

    def _completion_logprobs(self, choice: _Choice, chunk: Chunk) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for logprobs in chunk.logprobs or []:
            text = self._token_texts(logprobs.token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(logprobs.logprob)
            out["top_logprobs"].append({self._token_texts(token_id): logprob
                                        for token_id, logprob in zip(logprobs.top_token_ids, logprobs.top_logprobs)})
            out["text_offset"].append(choice.num_text_chars)
            choice.num_text_chars += len(text)
        for key, values in out.items():
            choice.completion_logprobs[key].extend(values)
        return out

    # ---- streaming ------------------------------------------------------------------------------
    def _chunk(self, choices: list[dict], index: int | None = None) -> dict:
        body = {"id": self.response_id, "object": "chat.completion.chunk" if self.is_chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices}
        if self._include_usage:
            body["usage"] = None
            if self.continuous_prompt_tokens is not None and index is not None:
                choice = self._choices[index]
                num_prompt_tokens = self.continuous_prompt_tokens[choice.prompt_index]
                body["usage"] = {"prompt_tokens": num_prompt_tokens, "completion_tokens": choice.num_completion_tokens,
                                 "total_tokens": num_prompt_tokens + choice.num_completion_tokens}
        return body

    def on_chunk(self, index: int, chunk: Chunk) -> list[dict]:
        choice = self._choices[index]
        choice.texts.append(chunk.text)
        out = []
        if self.is_chat:
            if not choice.is_started:
                choice.is_started = True
                out.append(self._chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}], index))
            choice.num_completion_tokens += len(chunk.token_ids)  # running count; the Final's is authoritative
            entries = [self._chat_logprob(lp) for lp in chunk.logprobs or []] if self._is_logprobs else []
            choice.chat_logprobs.extend(entries)
            if chunk.text or entries:
                out.append(self._chunk([{"index": index, "delta": {"content": chunk.text},
                                         "logprobs": {"content": entries} if self._is_logprobs else None,
                                         "finish_reason": None}], index))
            return out
        choice.num_completion_tokens += len(chunk.token_ids)
        logprobs = self._completion_logprobs(choice, chunk) if self._is_logprobs else None
        if chunk.text or (logprobs and logprobs["tokens"]):
            out.append(self._chunk([{"index": index, "text": chunk.text, "logprobs": logprobs,
                                     "finish_reason": None}], index))
        return out

    def on_final(self, index: int, finish: Finish) -> list[dict]:
        choice = self._choices[index]
        choice.finish_reason = finish.finish_reason
        choice.num_prompt_tokens = finish.num_prompt_tokens
        choice.num_completion_tokens = finish.num_completion_tokens
        if self.is_chat:
            last = {"index": index, "delta": {}, "logprobs": None, "finish_reason": choice.finish_reason}
        else:
            last = {"index": index, "text": "", "logprobs": None, "finish_reason": choice.finish_reason}
        return [self._chunk([last], index)]

    def usage(self) -> dict:
        prompt_tokens = {c.prompt_index: c.num_prompt_tokens for c in self._choices}
        num_prompt_tokens = sum(prompt_tokens.values())
        num_completion_tokens = sum(c.num_completion_tokens for c in self._choices)
        return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
                "total_tokens": num_prompt_tokens + num_completion_tokens}

    def usage_chunk(self) -> dict:
        return {**self._chunk([]), "usage": self.usage()}

    # ---- non-streamed ---------------------------------------------------------------------------
    def response(self) -> dict:
        choices = []
        for index, choice in enumerate(self._choices):
            text = "".join(choice.texts)
            if self.is_chat:
                logprobs = {"content": choice.chat_logprobs} if self._is_logprobs else None
                choices.append({"index": index, "message": {"role": "assistant", "content": text},
                                "logprobs": logprobs, "finish_reason": choice.finish_reason})
            else:
                logprobs = choice.completion_logprobs if self._is_logprobs else None
                choices.append({"index": index, "text": text, "logprobs": logprobs,
                                "finish_reason": choice.finish_reason})
        return {"id": self.response_id, "object": "chat.completion" if self.is_chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}
