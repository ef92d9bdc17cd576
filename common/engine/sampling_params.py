"""How one request wants its tokens chosen and when it stops (vLLM's names and meanings).

`SamplingParams` is the one table of sampling parameters: each field's line gives its name, type,
default, bounds, documentation, the protobuf fields that carry it and its OpenAI/vLLM name
(`common/engine/sampling_fields.py` says what each column means). Validation here and in the frontend,
protobuf conversion, the OpenAI schema and both protos' `SamplingParams` messages follow the table, so
adding a parameter touches the table, the sampler and tests; docs/architecture.md walks through it.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from common.engine.sampling_fields import Bounds, SamplingField, above, at_least, between, rows_of, sampling_field

MAX_LOGPROBS = 20  # vLLM's cap on top alternatives per token
DEFAULT_REQUEST_MAX_TOKENS = 256  # max_tokens of a request that leaves it out (frontend, offline)


@dataclass
class SamplingParams:
    temperature: float = sampling_field(
        1.0, at_least(0), "Softmax temperature: logits are divided by it; 0 is greedy",
        generation=2, worker=2, openai="temperature")
    top_p: float = sampling_field(
        1.0, between(0, 1, is_low_open=True),
        "Keep the smallest set of most likely tokens whose probability sums to >= top_p; 1 is off",
        generation=3, worker=3, openai="top_p")
    top_k: int = sampling_field(
        0, Bounds("0 or -1 (off) or >= 1", lambda value, _: value == -1 or value >= 0),
        "Keep the k most likely tokens",
        generation=4, worker=4, openai="top_k")
    min_p: float = sampling_field(
        0.0, between(0, 1), "Drop tokens less likely than min_p times the most likely one; 0 is off",
        generation=5, worker=5, openai="min_p")
    repetition_penalty: float = sampling_field(
        1.0, above(0), "Penalty on tokens seen in the prompt or the output: a positive logit is divided by "
        "it, a negative one multiplied; 1 is off",
        generation=7, worker=7, openai="repetition_penalty", changes_greedy=True)
    frequency_penalty: float = sampling_field(
        0.0, between(-2, 2), "Subtracted from a token's logit once per earlier occurrence in the output",
        generation=8, worker=8, openai="frequency_penalty", changes_greedy=True)
    presence_penalty: float = sampling_field(
        0.0, between(-2, 2), "Subtracted from a token's logit once if it occurs in the output",
        generation=9, worker=9, openai="presence_penalty", changes_greedy=True)
    seed: int | None = sampling_field(
        None, None, "Per-request seed: output token i is drawn with a generator seeded by (seed, i), so "
        "the request gets the same tokens alone or in any batch, on any worker",
        generation=6, worker=6, openai="seed", proto_type="int64",
        unset="tokens come from the worker's shared generator, so they depend on the batch")
    max_tokens: int = sampling_field(
        16, at_least(1), "Most tokens to generate, token #1 included (the frontend caps it at the room "
        "the context leaves)",
        generation=1, worker=1, openai="max_tokens", request_default=DEFAULT_REQUEST_MAX_TOKENS)
    min_tokens: int = sampling_field(
        0, Bounds("in [0, max_tokens]", lambda value, params: 0 <= value <= params.max_tokens),
        "EOS, stop tokens and stop strings cannot end generation before this many tokens",
        generation=13, worker=12, openai="min_tokens")
    stop_token_ids: list[int] = sampling_field(
        [], at_least(0), "Token ids that end generation (finish reason \"stop\"), besides the model's "
        "end-of-sequence tokens",
        generation=11, worker=10, openai="stop_token_ids")
    ignore_eos: bool = sampling_field(
        False, None, "Keep generating past end-of-sequence tokens (benchmarks)",
        generation=12, worker=11, openai="ignore_eos")
    logprobs: int | None = sampling_field(
        None, between(0, MAX_LOGPROBS), "Return the chosen token's log-probability plus this many most "
        "likely alternatives (the raw model's, before any sampling setting)",
        generation=14, worker=13, openai="logprobs", unset="no log-probabilities", changes_greedy=True)
    num_output_tokens_before: int = sampling_field(
        0, Bounds("in [0, max_tokens)", lambda value, params: 0 <= value < params.max_tokens),
        "Tokens the request generated before it was resumed on other workers mid-stream; they "
        "end its prompt_token_ids, and seeds, penalties, min_tokens and max_tokens count them as outputs, "
        "so the next token is output index num_output_tokens_before. 0 for a new request; fewer than the "
        "prompt_token_ids",
        worker=14, is_internal=True)

    def __post_init__(self) -> None:
        for row in ENGINE_FIELDS:
            row.check(getattr(self, row.name), self)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing else to compute: the token is the argmax of the raw logits."""
        return self.temperature == 0 and all(getattr(self, name) == default for name, default in _GREEDY_CHANGERS)

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The user-settable fields."""
        return tuple(row.name for row in ENGINE_FIELDS if not row.is_internal)


# The table, row by row: SamplingParams's fields, then what the frontend alone applies.
ENGINE_FIELDS: tuple[SamplingField, ...] = rows_of(SamplingParams, typing.get_type_hints(SamplingParams))
STOP_STRINGS = SamplingField(
    "stop", list[str], [], None, "Strings that end generation, matched in the text by the frontend; the "
    "matched string is not included in the output", generation=10, openai="stop", is_engine=False)
SAMPLING_FIELDS: tuple[SamplingField, ...] = (*ENGINE_FIELDS, STOP_STRINGS)
# (name, default) of the rows whose other values send even a greedy row through the sampler
_GREEDY_CHANGERS = tuple((row.name, row.default) for row in ENGINE_FIELDS if row.changes_greedy)
