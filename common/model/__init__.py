"""Models by family (common/model/families/, looked up by HF architecture), their config, and where
their weights come from.

    resolved = resolve_model(args.model, args.load_format)          # folder, name, load_format
    model, config = load_model(resolved.folder, resolved.load_format, dtype, device,
                               attention_backend, model_config=resolved.model_config)
    hidden = model(input_ids, positions, kv_cache, metadata)         # [T, hidden]
    logits = model.compute_logits(hidden[last_token_indices])        # [N, vocab] float32

The names load on first use, so a process that only resolves a model name (the frontend, through
`registry`) imports this package without torch.
"""

from common.lazy_names import lazy_names

_NAMES_BY_MODULE = {
    "common.model.architectures": ("family_for_architecture", "known_architectures"),
    "common.model.config": ("ModelConfig", "RopeScaling"),
    "common.model.family": ("ModelFamily",),
    "common.model.registry": ("ResolvedModel", "resolve_model"),
    "common.model.weights": ("WeightLoadError", "load_model"),
}
__all__ = sorted(name for names in _NAMES_BY_MODULE.values() for name in names)
__getattr__ = lazy_names(__name__, _NAMES_BY_MODULE)
