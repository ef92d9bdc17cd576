"""What the table of sampling parameters says about each one, and how a value is checked against it.

The table itself is `SamplingParams` (`common/engine/sampling_params.py`): every field is declared with
`sampling_field(...)`, which records its bounds, its documentation, the protobuf messages that carry it
and its OpenAI/vLLM request name. Validation, protobuf conversion (`services/common/worker_messages.py`,
`services/frontend/validation.py`), the OpenAI schema (`services/frontend/openai/protocol.py`) and the
protos' `SamplingParams` messages (`common/engine/sampling_protos.py`) are all driven by it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable

SPEC_KEY = "sampling"  # dataclasses.Field.metadata key holding a field's SamplingField


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Bounds:
    """A range, described by `text` in error messages and proto comments."""

    text: str  # e.g. "in (0, 1]"; errors read "<name> must be <text>"
    contains: Callable[[Any, Any], bool]  # (value, the whole SamplingParams) -> whether the value is valid


def at_least(low: float) -> Bounds:
    return Bounds(f">= {low}", lambda value, _: value >= low)


def above(low: float) -> Bounds:
    return Bounds(f"> {low}", lambda value, _: value > low)


def between(low: float, high: float, *, is_low_open: bool = False) -> Bounds:
    """[low, high], or (low, high] when `is_low_open`."""
    if is_low_open:
        return Bounds(f"in ({low}, {high}]", lambda value, _: low < value <= high)
    return Bounds(f"in [{low}, {high}]", lambda value, _: low <= value <= high)


_SCALAR_CHECKS = {int: _is_int, float: _is_number, bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}
# Protobuf scalar type of each Python type a sampling field may have (a list is a repeated field).
PROTO_TYPES = {float: "float", int: "int32", bool: "bool", str: "string"}


@dataclass(frozen=True)
class SamplingField:
    """One row of the table of sampling parameters."""

    name: str  # vLLM's SamplingParams name; also the field's name in both protos
    python_type: Any  # float, int, bool, int | None, list[int] or list[str]
    default: Any  # the engine's default (vLLM's); None = off
    bounds: Bounds | None  # valid values beyond the type; None = any value of the type
    doc: str  # what it does, one sentence (the protos' comments)
    generation: int | None = None  # field number in tandem.v1.SamplingParams (public API); None = not there
    worker: int | None = None  # field number in tandem.worker.v1.SamplingParams (internal API); None = not there
    openai: str | None = None  # request parameter of the OpenAI/vLLM HTTP API; None = not offered there
    proto_type: str | None = None  # protobuf scalar type when PROTO_TYPES' choice is too narrow (int64 seeds)
    unset: str = ""  # what leaving it out means, for a field whose default is None
    request_default: Any = None  # the frontend's value when a request leaves it out, when not `default`
    changes_greedy: bool = False  # a non-default value sends even a greedy row through the sampler
    is_engine: bool = True  # False: applied by the frontend alone (stop strings), not a SamplingParams field
    is_internal: bool = False  # set by Tandem itself, never by a user

    @functools.cached_property
    def scalar_type(self) -> Any:
        """The type of one value: int for `int | None` and for `list[int]`."""
        if self.is_list:
            return self.python_type.__args__[0]
        args = [arg for arg in getattr(self.python_type, "__args__", ()) if arg is not type(None)]
        return args[0] if args else self.python_type

    @functools.cached_property
    def is_list(self) -> bool:
        return getattr(self.python_type, "__origin__", None) is list

    @functools.cached_property
    def is_optional(self) -> bool:
        """Whether None is a value (the worker proto then marks it `optional`)."""
        return self.default is None and not self.is_list

    @property
    def default_when_unset(self) -> Any:
        return self.default if self.request_default is None else self.request_default

    @property
    def proto_scalar_type(self) -> str:
        return self.proto_type or PROTO_TYPES[self.scalar_type]

    def check(self, value: Any, params: Any) -> None:
        """Raises ValueError starting with the field name when `value` has the wrong type or is out of bounds."""
        if self.is_optional and value is None:
            return
        if not self._has_type(value) or (self.bounds is not None and not self._is_within(value, params)):
            raise ValueError(f"{self.name} must be {self._expected()}, got {value!r}")

    def _is_within(self, value: Any, params: Any) -> bool:
        if self.is_list:
            return all(self.bounds.contains(item, params) for item in value)
        return self.bounds.contains(value, params)

    def _has_type(self, value: Any) -> bool:
        is_scalar = _SCALAR_CHECKS[self.scalar_type]
        if self.is_list:
            return isinstance(value, (list, tuple)) and all(is_scalar(item) for item in value)
        return is_scalar(value)

    def _expected(self) -> str:
        bounds = f" {self.bounds.text}" if self.bounds is not None else ""
        if self.is_list:
            return f"a list of {'token ids' if self.scalar_type is int else 'strings'}{bounds}"
        if self.scalar_type is bool:
            return "a bool"
        kind = "an int" if self.scalar_type is int else ""
        described = f"{kind}{bounds}".strip()
        return f"{described} or None" if self.is_optional else described


def sampling_field(default: Any, bounds: Bounds | None, doc: str, **spec: Any) -> Any:
    """Declares one SamplingParams field and its row of the table (keywords: SamplingField's)."""
    metadata = {SPEC_KEY: dict(default=default, bounds=bounds, doc=doc, **spec)}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def rows_of(dataclass_type: type, type_hints: dict[str, Any]) -> tuple[SamplingField, ...]:
    """The table rows declared by `sampling_field` on `dataclass_type`, in declaration order."""
    return tuple(
        SamplingField(name=field.name, python_type=type_hints[field.name], **field.metadata[SPEC_KEY])
        for field in dataclasses.fields(dataclass_type)
    )
