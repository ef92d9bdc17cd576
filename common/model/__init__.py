"""Models by family (common/model/families/, looked up by HF architecture), their config, and where
their weights come from.

    resolved = resolve_model(args.model, args.load_format)          # folder, name, load_format
    model, config = load_model(resolved.folder, resolved.load_format, dtype, device,
                               attention_backend, model_config=resolved.model_config)
    hidden = model(input_ids, positions, kv_cache, metadata)         # [T, hidden]
    logits = model.compute_logits(hidden[last_token_indices])        # [N, vocab] float32
"""

from common.model.config import ModelConfig, RopeScaling
from common.model.architectures import family_for_architecture, known_architectures
from common.model.family import ModelFamily
from common.model.registry import ResolvedModel, resolve_model
from common.model.weights import WeightLoadError, load_model

__all__ = [
    "ModelConfig",
    "ModelFamily",
    "ResolvedModel",
    "RopeScaling",
    "WeightLoadError",
    "family_for_architecture",
    "known_architectures",
    "load_model",
    "resolve_model",
]
