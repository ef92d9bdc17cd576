"""The inference engine, split like nano-vllm: state (`sequence`), decisions (`scheduler`), device
work (`model_runner`, `sampler`), and the loop gluing them (`llm_engine`). See docs/architecture.md.

Names are imported lazily so that light users (the frontend needs only `SamplingParams`) do not
pull in the model and torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "EngineConfig": "common.engine.config",
    "LLMEngine": "common.engine.llm_engine",
    "RequestOutput": "common.engine.outputs",
    "EngineStats": "common.engine.outputs",
    "SamplingParams": "common.engine.sampling_params",
    "TokenLogprobs": "common.engine.sequence",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'common.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
