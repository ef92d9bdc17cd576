"""The names a model can be loaded by: weight formats and dtypes. No torch here, so configs and command
lines check them without importing it; `weights.py` maps a dtype name to its torch dtype."""

from __future__ import annotations

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")  # vLLM's --load-format values Tandem reads
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # what a model computes and keeps its KV in
DTYPE_ALIASES = {"float": "float32", "fp32": "float32", "half": "float16", "fp16": "float16", "bf16": "bfloat16"}


def canonical_dtype_name(name: str) -> str | None:
    """'bf16', 'torch.bfloat16' or 'bfloat16' -> 'bfloat16'; None for a name that is none of DTYPE_NAMES."""
    name = str(name).removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    return name if name in DTYPE_NAMES else None
