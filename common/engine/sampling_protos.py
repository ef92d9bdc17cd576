"""Writes the `SamplingParams` message of generation.proto and worker.proto from the table of sampling
parameters (`common/engine/sampling_params.py`), so field numbers, types and comments follow the table.

`python -m common.engine.sampling_protos` rewrites both messages, then rebuilds the stubs;
tests/services/test_sampling_table.py fails while a proto differs from what the table gives.
Only the message's body is written: the comment above `message SamplingParams {` stays as written.
"""

from __future__ import annotations

import pathlib
import re
import textwrap

from common.engine.sampling_fields import SamplingField
from common.engine.sampling_params import SAMPLING_FIELDS

PROTOS_DIR = pathlib.Path(__file__).resolve().parents[2] / "protos"
MESSAGE_FILES = {"generation": PROTOS_DIR / "generation.proto", "worker": PROTOS_DIR / "worker.proto"}
GENERATED_NOTE = "// Generated from the table in common/engine/sampling_params.py by `python -m common.engine.sampling_protos`."
_MESSAGE = re.compile(r"^message SamplingParams \{\n.*?^\}\n", re.MULTILINE | re.DOTALL)
_LINE_WIDTH = 110
_UNBROKEN_SPACE = "\0"


def _literal(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value)


def _comment(row: SamplingField, api: str) -> str:
    """generation: the public API, where an unset field takes its default; worker: values are resolved."""
    sentences = [row.doc + "."]
    if row.bounds is not None:
        sentence = f"Each must be {row.bounds.text}." if row.is_list else f"Must be {row.bounds.text}."
        sentences.append(sentence.replace(" ", _UNBROKEN_SPACE))  # never wrapped across lines
    if row.is_optional:
        sentences.append(f"Unset: {row.unset}.")
    elif api == "generation" and not row.is_list:
        sentences.append(f"Default{_UNBROKEN_SPACE}{_literal(row.default_when_unset)}.")
    return " ".join(sentences)


def _declaration(row: SamplingField, api: str) -> str:
    number = getattr(row, api)
    if row.is_list:
        label = "repeated "
    elif api == "generation" or row.is_optional:
        label = "optional "  # the public API tells an unset field from an explicit 0
    else:
        label = ""
    return f"{label}{row.proto_scalar_type} {row.name} = {number};"


def render_message(api: str) -> str:
    """The `message SamplingParams { ... }` block of `api` ("generation" or "worker")."""
    rows = sorted((row for row in SAMPLING_FIELDS if getattr(row, api) is not None), key=lambda r: getattr(r, api))
    lines = ["message SamplingParams {", f"  {GENERATED_NOTE}"]
    for row in rows:
        comment = textwrap.wrap(_comment(row, api), _LINE_WIDTH, initial_indent="  // ", subsequent_indent="  // ")
        lines += [line.replace(_UNBROKEN_SPACE, " ") for line in comment]
        lines.append(f"  {_declaration(row, api)}")
    return "\n".join(lines) + "\n}\n"


def rendered_file(api: str) -> str:
    """The proto file of `api` with its SamplingParams message as the table gives it."""
    text = MESSAGE_FILES[api].read_text()
    if len(_MESSAGE.findall(text)) != 1:
        raise ValueError(f"{MESSAGE_FILES[api].name}: expected exactly one `message SamplingParams {{ ... }}`")
    return _MESSAGE.sub(lambda _: render_message(api), text)


def write_messages() -> list[pathlib.Path]:
    """Rewrites the protos whose SamplingParams differ from the table; returns the files it changed."""
    changed = []
    for api, path in MESSAGE_FILES.items():
        text = rendered_file(api)
        if text != path.read_text():
            path.write_text(text)
            changed.append(path)
    return changed


if __name__ == "__main__":
    from protos.build import ensure_built

    for path in write_messages():
        print(f"{path.name}: SamplingParams rewritten from the table of sampling parameters")
    ensure_built(force=True)
    print("protos built")
