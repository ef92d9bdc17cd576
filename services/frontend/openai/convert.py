"""OpenAI request -> one `GenerateRequest` per choice (the HTTP API's edge conversion).

A request with P prompts and `n` choices fans out into P x n gRPC-path requests; choice index
`p * n + i` is prompt p's i-th choice (OpenAI's and vLLM's numbering).

Seeds: with `seed` set, choice i of every prompt is sampled with seed `seed + i` (wrapped into int64).
So a request with n=1 and seed s samples exactly what a gRPC Generate with seed s samples, choice i is
reproducible across calls and does not depend on the other prompts in the batch. Without `seed`, every
choice is drawn from its worker's shared generator, so it depends on what else is in the batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from common.engine.sampling_params import SAMPLING_FIELDS, SamplingParams
from protos import generation_pb2
from services.frontend.openai.errors import bad_request, model_not_found
from services.frontend.openai.protocol import (
    COPIED_SAMPLING_FIELDS,
    MAX_NUM_CHOICES,
    ChatCompletionRequest,
    CompletionRequest,
    _GenerationParams,
)

_INT64_MIN, _INT64_RANGE = -(2**63), 2**64
# vLLM's default, which is OpenAI's for /v1/completions (chat uses the frontend's)
COMPLETIONS_DEFAULT_MAX_TOKENS = SamplingParams().max_tokens
# The OpenAI name of every sampling parameter that has one, for errors the frontend's validation names.
_OPENAI_NAMES = {row.name: row.openai for row in SAMPLING_FIELDS if row.openai}


@dataclass
class ChoiceRequest:
    index: int  # choice index in the response
    prompt_index: int  # which prompt of the batch it answers
    request: generation_pb2.GenerateRequest


def choice_seed(seed: int, choice: int) -> int:
    """seed + choice, wrapped into the signed 64-bit range the proto carries."""
    return (seed + choice - _INT64_MIN) % _INT64_RANGE + _INT64_MIN


def _set(sampling: generation_pb2.SamplingParams, field: str, value, param: str) -> None:
    try:
        if isinstance(value, list):
            getattr(sampling, field).extend(value)
        else:
            setattr(sampling, field, value)
    except (ValueError, TypeError) as exc:  # e.g. an int too large for the proto's int32
        raise bad_request(param, f"{value!r} is out of range ({exc})") from exc


def _sampling(params: _GenerationParams, max_tokens: int | None, num_logprobs: int | None,
              max_tokens_param: str = "max_tokens", logprobs_param: str = "logprobs") -> generation_pb2.SamplingParams:
    sampling = generation_pb2.SamplingParams()
    for row in COPIED_SAMPLING_FIELDS:
        if getattr(params, row.openai) is not None:
            _set(sampling, row.name, getattr(params, row.openai), row.openai)
    if max_tokens is not None:
        _set(sampling, "max_tokens", max_tokens, max_tokens_param)
    if num_logprobs is not None:
        _set(sampling, "logprobs", num_logprobs, logprobs_param)
    if params.stop is not None:
        sampling.stop.extend([params.stop] if isinstance(params.stop, str) else params.stop)
    return sampling


def _fan_out(params: _GenerationParams, prompts: list[generation_pb2.GenerateRequest],
             sampling: generation_pb2.SamplingParams, request_id: str) -> list[ChoiceRequest]:
    if len(prompts) * params.n > MAX_NUM_CHOICES:
        raise bad_request("n", f"{len(prompts)} prompts x n={params.n} is more than {MAX_NUM_CHOICES} choices")
    choices = []
    for prompt_index, prompt in enumerate(prompts):
        for i in range(params.n):
            index = prompt_index * params.n + i
            request = generation_pb2.GenerateRequest(request_id=f"{request_id}-{index}")
            request.MergeFrom(prompt)
            request.sampling.CopyFrom(sampling)
            if params.seed is not None:
                request.sampling.seed = choice_seed(params.seed, i)
            choices.append(ChoiceRequest(index, prompt_index, request))
    return choices


def completion_requests(body: CompletionRequest, request_id: str) -> list[ChoiceRequest]:
    prompt = body.prompt
    if isinstance(prompt, list) and not prompt:
        raise bad_request("prompt", "must not be empty")
    try:
        if isinstance(prompt, str):
            prompts = [generation_pb2.GenerateRequest(text=prompt)]
        elif isinstance(prompt[0], str):
            prompts = [generation_pb2.GenerateRequest(text=text) for text in prompt]
        elif isinstance(prompt[0], int):
            prompts = [generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=prompt))]
        else:
            prompts = [generation_pb2.GenerateRequest(token_ids=generation_pb2.TokenIds(ids=ids)) for ids in prompt]
    except ValueError as exc:  # a token id beyond int32
        raise bad_request("prompt", str(exc)) from exc
    max_tokens = body.max_tokens if body.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS
    return _fan_out(body, prompts, _sampling(body, max_tokens, body.logprobs), request_id)


def chat_requests(body: ChatCompletionRequest, request_id: str) -> list[ChoiceRequest]:
    messages = [
        generation_pb2.ChatMessage(role="system" if m.role == "developer" else m.role, content=m.text())
        for m in body.messages
    ]
    prompt = generation_pb2.GenerateRequest(chat=generation_pb2.ChatMessages(messages=messages))
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    num_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    sampling = _sampling(body, max_tokens, num_logprobs, body.max_tokens_param, "top_logprobs")
    return _fan_out(body, [prompt], sampling, request_id)


_PROMPT_FIELD = re.compile(r"^(text|token_ids(\.ids)?)(?P<index>\[\d+\])?$")


def public_param(field: str, body: CompletionRequest | ChatCompletionRequest, prompt_index: int) -> str | None:
    """A GenerateRequest field named by the frontend's validation -> the OpenAI parameter."""
    if field.startswith("sampling."):
        name = field.removeprefix("sampling.")
        if name == "max_tokens" and isinstance(body, ChatCompletionRequest):
            return body.max_tokens_param
        if name == "logprobs" and isinstance(body, ChatCompletionRequest):
            return "top_logprobs"
        return _OPENAI_NAMES.get(name, name)
    if field.startswith("chat"):
        return "messages" + field.removeprefix("chat").removeprefix(".messages")
    match = _PROMPT_FIELD.match(field)
    if match:
        is_batch = isinstance(body, CompletionRequest) and isinstance(body.prompt, list) and (
            isinstance(body.prompt[0], (str, list)))
        return "prompt" + (f"[{prompt_index}]" if is_batch else "") + (match["index"] or "")
    return None if field == "request_id" else field


def check_model(requested: str | None, served: str) -> None:
    """Raises 404 unless `requested` is the served model (or left out)."""
    if requested is not None and requested != served:
        raise model_not_found(requested)
