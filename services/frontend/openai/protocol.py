"""OpenAI request bodies as pydantic models: types only, values are checked by the frontend's validation.

Every model forbids extra keys, so a parameter this server does not implement (`echo`, `tools`,
`response_format`, ...) is rejected by name instead of being silently ignored. Ranges (temperature >= 0,
top_p in (0, 1], max_tokens >= 1, ...) are NOT checked here: the request is converted to a
`GenerateRequest` and `services.frontend.validation` rejects it exactly as it would over gRPC.
Only what has no gRPC counterpart (n, stream_options, the logprobs/top_logprobs pairing) is checked here.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, create_model, model_validator

from common.engine.sampling_fields import SamplingField
from common.engine.sampling_params import MAX_LOGPROBS, SAMPLING_FIELDS

MAX_NUM_CHOICES = 128  # prompts x n per request (OpenAI's own cap on n)
MAX_COMPLETION_LOGPROBS = MAX_LOGPROBS  # vLLM's cap (OpenAI's is 5)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool | None = None  # a last chunk with empty `choices` carries the usage
    continuous_usage_stats: bool | None = None  # vLLM's: with include_usage, every chunk carries usage so far


# Sampling parameters whose OpenAI form differs from the proto's, declared and converted by hand: max_tokens
# (chat's alias, /v1/completions' default), seed (one per choice), stop (a string or a list) and logprobs
# (chat's boolean plus top_logprobs).
HAND_MAPPED_SAMPLING = ("max_tokens", "seed", "stop", "logprobs")
# The others are declared from the table of sampling parameters and copied into the proto as they come.
COPIED_SAMPLING_FIELDS = tuple(row for row in SAMPLING_FIELDS if row.openai and row.name not in HAND_MAPPED_SAMPLING)


def _annotation(row: SamplingField):
    """The request body's type of a copied sampling field: its own type, or null for the server default."""
    if row.is_list:
        return list[StrictInt] | None if row.scalar_type is int else list[row.scalar_type] | None
    return row.scalar_type | None


_SamplingParameters = create_model(
    "_SamplingParameters", __base__=_Strict,
    **{row.openai: (_annotation(row), None) for row in COPIED_SAMPLING_FIELDS},
)


class _GenerationParams(_SamplingParameters):
    """Parameters shared by /v1/completions and /v1/chat/completions (OpenAI's plus vLLM's extras): the
    sampling parameters copied from the table, and these."""

    model: str | None = None  # None = the served model
    max_tokens: int | None = None
    n: int = 1  # choices per prompt; choice i is seeded with seed + i (see convert.choice_seed)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility, unused

    @model_validator(mode="after")
    def _check_openai_only(self):
        if self.n < 1:
            raise ValueError(f"n: must be >= 1, got {self.n}")
        if self.n > MAX_NUM_CHOICES:
            raise ValueError(f"n: must be <= {MAX_NUM_CHOICES}, got {self.n}")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


class CompletionRequest(_GenerationParams):
    """POST /v1/completions: one prompt, or a batch, as text or as token ids."""

    prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]
    logprobs: int | None = None  # chosen token's logprob plus this many alternatives

    @model_validator(mode="after")
    def _check_logprobs(self):
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise ValueError(f"logprobs: must be in [0, {MAX_COMPLETION_LOGPROBS}], got {self.logprobs}")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: str  # system / developer (= system) / user / assistant; others fail the frontend's check
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_GenerationParams):
    """POST /v1/chat/completions: messages rendered with the model's chat template."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool = False
    top_logprobs: int | None = None

    @model_validator(mode="after")
    def _check_chat(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("max_completion_tokens: give either max_tokens or max_completion_tokens, not both")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: requires logprobs to be true")
        return self

    @property
    def max_tokens_param(self) -> str:
        """The name the client used, so errors about the value name it."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
