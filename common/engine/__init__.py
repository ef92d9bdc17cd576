"""The inference engine, split like nano-vllm: state (`sequence`), decisions (`scheduler`), device
work (`model_runner`, `sampler`), and the loop gluing them (`llm_engine`). See docs/architecture.md.

Names are imported lazily so that light users (the frontend needs only `SamplingParams`) do not
pull in the model and torch.
"""

from __future__ import annotations

from common.lazy_names import lazy_names

_NAMES_BY_MODULE = {
    "common.engine.config": ("EngineConfig",),
    "common.engine.llm_engine": ("LLMEngine",),
    "common.engine.outputs": ("RequestOutput", "EngineStats"),
    "common.engine.sampling_params": ("SamplingParams",),
    "common.engine.sequence": ("TokenLogprobs",),
}

__all__ = [name for names in _NAMES_BY_MODULE.values() for name in names]
__getattr__ = lazy_names(__name__, _NAMES_BY_MODULE)
