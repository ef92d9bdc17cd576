"""The Llama-family model (Llama, Qwen2, Mistral), its config, and where its weights come from.

    resolved = resolve_model(args.model, args.load_format)          # folder, name, load_format
    model, config = load_model(resolved.folder, resolved.load_format, dtype, device,
                               attention_backend, model_config=resolved.model_config)
    hidden = model(input_ids, positions, kv_cache, metadata)         # [T, hidden]
    logits = model.compute_logits(hidden[last_token_indices])        # [N, vocab] float32

The names load on first use, so a process that only resolves a model name (the frontend, through
`registry`) imports this package without torch.
"""

import importlib

_MODULE_OF = {
    "LlamaForCausalLM": "common.model.llama",
    "ModelConfig": "common.model.config",
    "ResolvedModel": "common.model.registry",
    "RopeScaling": "common.model.config",
    "WeightLoadError": "common.model.llama",
    "load_model": "common.model.weights",
    "resolve_model": "common.model.registry",
}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'common.model' has no attribute {name!r}")
