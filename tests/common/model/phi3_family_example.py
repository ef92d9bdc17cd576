"""Phi-3 (`Phi3ForCausalLM`) as a model family: the worked example of docs/architecture.md, "Adding a
model family". Dropped into common/model/families/ as `phi3.py`, it would serve Phi-3 checkpoints;
tests/common/model/test_architectures.py loads it that way and checks it against transformers.

Phi-3 is the Llama decoder (RMSNorm, rotate-half RoPE, SwiGLU, no biases) whose checkpoints already
stack q/k/v into `qkv_proj` and gate/up into `gate_up_proj`, the layout LlamaForCausalLM keeps them in;
what the family adds is its config rules and its tensor names.
"""

from __future__ import annotations

from typing import Any

from common.model.config import ModelConfig, decoder_fields
from common.model.families.llama import LlamaForCausalLM
from common.model.family import ModelFamily, decoder_weight_names


def parse_config(hf: dict[str, Any], generation: dict[str, Any], model_type: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    rope = hf.get("rope_parameters") or {}
    if rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor below 1 is not supported")
    fields = decoder_fields(hf, generation)  # rejects RoPE scalings other than llama3 and linear (longrope)
    if hf.get("sliding_window"):  # within the window, sliding-window attention is full attention
        fields["max_position_embeddings"] = min(fields["max_position_embeddings"], hf["sliding_window"])
    return ModelConfig(architecture=model_type, **fields)


def weight_names(config: ModelConfig) -> list[str]:
    layer_tensors = ["input_layernorm", "post_attention_layernorm", "self_attn.qkv_proj", "self_attn.o_proj",
                     "mlp.gate_up_proj", "mlp.down_proj"]
    return decoder_weight_names(config, [f"{name}.weight" for name in layer_tensors])


def parameter_slice(hf_name: str, config: ModelConfig) -> tuple[str, slice | None] | None:
    if hf_name == "lm_head.weight" and config.tie_word_embeddings:
        return None
    return hf_name, None  # the checkpoint's names and stacking are already the model's


FAMILY = ModelFamily(
    name="phi3", architectures={"Phi3ForCausalLM": "phi3"}, parse_config=parse_config,
    build_model=LlamaForCausalLM, weight_names=weight_names, parameter_slice=parameter_slice,
)
