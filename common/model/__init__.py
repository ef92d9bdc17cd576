"""The Llama-family model (Llama, Qwen2, Mistral), its config, and where its weights come from.

    resolved = resolve_model(args.model, args.load_format)          # folder, name, load_format
    model, config = load_model(resolved.folder, resolved.load_format, dtype, device,
                               attention_backend, model_config=resolved.model_config)
    hidden = model(input_ids, positions, kv_cache, metadata)         # [T, hidden]
    logits = model.compute_logits(hidden[last_token_indices])        # [N, vocab] float32
"""

from common.model.config import ModelConfig, RopeScaling
from common.model.llama import LlamaForCausalLM, WeightLoadError
from common.model.registry import ResolvedModel, resolve_model
from common.model.weights import load_model

__all__ = [
    "LlamaForCausalLM",
    "ModelConfig",
    "ResolvedModel",
    "RopeScaling",
    "WeightLoadError",
    "load_model",
    "resolve_model",
]
