"""What a model family provides: everything Tandem needs to serve the checkpoints of some HF architectures.

A family is one module in `common/model/families/` that defines `FAMILY = ModelFamily(...)`;
`common/model/architectures.py` finds it by the names in its `architectures`. The rest of Tandem meets a
family only here:

    config.json ──parse_config──► ModelConfig ──build_model──► nn.Module (forward, compute_logits)
    *.safetensors names ──weight_names / parameter_slice──► the module's parameters (weights.py)
    model.gguf names ──gguf──► HF names and config.json (gguf_convert.py)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from common.model.config import ModelConfig

if TYPE_CHECKING:
    from torch import nn

    from common.attention import AttentionBackend


def decoder_weight_names(config: ModelConfig, layer_tensors: list[str]) -> list[str]:
    """The HF tensor names of a decoder checkpoint: the embedding, the final norm, `lm_head` unless tied,
    then `model.layers.N.<name>` for each of `layer_tensors` (e.g. "mlp.down_proj.weight") in every layer."""
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_hidden_layers):
        names += [f"model.layers.{i}.{name}" for name in layer_tensors]
    return names


def no_extra_gguf_config(gguf_architecture: str, tensor_names: set[str]) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class GGUFMapping:
    """How llama.cpp's GGUF files of the family map onto its HF checkpoints (`gguf_convert.py`)."""

    architectures: dict[str, str]  # GGUF `general.architecture` -> HF architecture, e.g. {"qwen2": "Qwen2ForCausalLM"}
    block_tensors: dict[str, str]  # `blk.N.<part>.weight|bias` part -> HF part of `model.layers.N.<part>`
    global_tensors: dict[str, str]  # whole GGUF tensor name -> HF tensor name
    permuted_query_key: tuple[str, ...] = ()  # GGUF architectures whose Q/K rows llama.cpp permuted for its RoPE
    # (GGUF architecture, names of the file's tensors) -> config.json keys only this family writes
    extra_config: Callable[[str, set[str]], dict[str, Any]] = no_extra_gguf_config


@dataclass(frozen=True)
class ModelFamily:
    name: str  # e.g. "llama"
    # HF `architectures` entry -> the model_type it comes with, e.g. {"Qwen2ForCausalLM": "qwen2"};
    # ModelConfig.architecture holds that model_type, so one family can serve several variants.
    architectures: dict[str, str]
    # (config.json, generation_config.json or {}, model_type) -> ModelConfig; a ValueError naming each field
    # the family cannot reproduce exactly, rather than computing something else
    parse_config: Callable[[dict[str, Any], dict[str, Any], str], ModelConfig]
    # (config, attention backend) -> the model: forward(input_ids [T], positions [T], kv_cache, metadata)
    # -> hidden [T, hidden]; compute_logits(hidden [N, hidden], out=None) -> [N, vocab] float32;
    # `config` and `attention_backend` attributes. Built on the meta device, then materialised.
    build_model: Callable[[ModelConfig, "AttentionBackend"], "nn.Module"]
    # config -> every tensor name an HF checkpoint of that config must provide
    weight_names: Callable[[ModelConfig], list[str]]
    # (HF tensor name, config) -> (the model's parameter name, the rows that tensor fills, None for all),
    # or None for a tensor that carries nothing to load (e.g. a cached RoPE table)
    parameter_slice: Callable[[str, ModelConfig], tuple[str, slice | None] | None]
    gguf: GGUFMapping | None = None  # None: the family has no GGUF conversion
    model_types: tuple[str, ...] = field(init=False)  # the distinct model_types of `architectures`

    def __post_init__(self) -> None:
        if not self.architectures:
            raise ValueError(f"model family {self.name!r} names no architectures")
        object.__setattr__(self, "model_types", tuple(dict.fromkeys(self.architectures.values())))
