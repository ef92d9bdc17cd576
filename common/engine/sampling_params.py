"""How one request wants its tokens chosen and when it stops (vLLM's names and meanings)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

MAX_LOGPROBS = 20


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy; otherwise logits are divided by it
    top_p: float = 1.0  # keep the smallest set of tokens whose probability sums to >= top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = off
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely token)
    repetition_penalty: float = 1.0  # > 1 discourages tokens seen in the prompt or output
    frequency_penalty: float = 0.0  # subtracted once per earlier occurrence in the output
    presence_penalty: float = 0.0  # subtracted once if the token occurs in the output
    seed: int | None = None  # per-request seed: same tokens alone or in any batch
    max_tokens: int = 16  # most tokens to generate
    min_tokens: int = 0  # EOS and stop tokens are ignored before this many tokens
    stop_token_ids: list[int] = field(default_factory=list)  # finish ("stop") on any of these
    ignore_eos: bool = False  # keep going past EOS (benchmarks)
    logprobs: int | None = None  # None = off; n = chosen token's logprob plus the top n
    # Internal (not a user setting): tokens the request generated before it was resumed elsewhere; they
    # end its prompt_token_ids, and seeds, penalties, min_tokens and max_tokens count them as outputs.
    num_output_tokens_before: int = field(default=0, metadata={"is_internal": True})

    def __post_init__(self) -> None:
        self._check_number("temperature", lambda v: v >= 0, ">= 0")
        self._check_number("top_p", lambda v: 0 < v <= 1, "in (0, 1]")
        self._check_number("min_p", lambda v: 0 <= v <= 1, "in [0, 1]")
        self._check_number("repetition_penalty", lambda v: v > 0, "> 0")
        self._check_number("frequency_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
        self._check_number("presence_penalty", lambda v: -2 <= v <= 2, "in [-2, 2]")
        self._check_int("top_k", lambda v: v == -1 or v >= 0, "0 or -1 (off) or >= 1")
        self._check_int("max_tokens", lambda v: v >= 1, ">= 1")
        self._check_int("min_tokens", lambda v: 0 <= v <= self.max_tokens, "in [0, max_tokens]")
        self._check_int("num_output_tokens_before", lambda v: 0 <= v < self.max_tokens, "in [0, max_tokens)")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an int or None, got {self.seed!r}")
        if self.logprobs is not None:
            self._check_int("logprobs", lambda v: 0 <= v <= MAX_LOGPROBS, f"in [0, {MAX_LOGPROBS}] or None")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(f"stop_token_ids must be a list of token ids >= 0, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy with nothing else to compute: the token is the argmax of the raw logits."""
        return self.temperature == 0 and self.logprobs is None and not self.has_penalties

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The user-settable fields."""
        return tuple(f.name for f in fields(cls) if not f.metadata.get("is_internal"))

    def _check_number(self, name: str, is_valid, expected: str) -> None:
        value = getattr(self, name)
        if not _is_number(value) or not is_valid(value):
            raise ValueError(f"{name} must be {expected}, got {value!r}")

    def _check_int(self, name: str, is_valid, expected: str) -> None:
        value = getattr(self, name)
        if not _is_int(value) or not is_valid(value):
            raise ValueError(f"{name} must be an int {expected}, got {value!r}")
