"""The Llama family: Llama, Mistral and Qwen2, one decoder over the paged KV pool.

    LlamaForCausalLM    model_type llama     optional bias on q/k/v/o, Llama 3 RoPE scaling
    MistralForCausalLM  model_type mistral   sliding window: the context is capped at the window
    Qwen2ForCausalLM    model_type qwen2     bias on q/k/v (never o)

What differs between the three is data in ModelConfig, read by `parse_config`. The forward pass takes
a flat batch of new tokens from any number of sequences (packed prefill, decode, or a mix) and never
sees sequences itself: where each token's K/V goes and what it attends to is all in
`AttentionMetadata`, handled by the attention backend.

Parameter names mirror transformers' (`model.layers.3.self_attn...`), except that q/k/v are fused
into `qkv_proj` and gate/up into `gate_up_proj`; `parameter_slice` says which rows each HF tensor fills.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.attention import AttentionBackend, AttentionMetadata
from common.model.config import ModelConfig, decoder_fields
from common.model.family import GGUFMapping, ModelFamily, decoder_weight_names
from common.model.layers import RMSNorm, RotaryEmbedding, SwiGLUMLP
from common.model.ops import ModelOps, model_ops

ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}
IGNORED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)  # checkpoint tensors that carry no learned state


def parse_config(hf: dict[str, Any], generation: dict[str, Any], model_type: str) -> ModelConfig:
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (only silu)")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    if model_type == "qwen2" and hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported for qwen2")
    fields = decoder_fields(hf, generation)
    if model_type == "mistral" and hf.get("sliding_window"):
        # Within the window, sliding-window attention equals full attention: cap the context there.
        fields["max_position_embeddings"] = min(fields["max_position_embeddings"], hf["sliding_window"])
    has_llama_bias = model_type != "qwen2" and bool(hf.get("attention_bias", False))
    return ModelConfig(
        architecture=model_type, attention_bias=model_type == "qwen2" or has_llama_bias,
        attention_output_bias=has_llama_bias, **fields,
    )


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, ops: ModelOps):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.backend = backend
        self.ops = ops
        self.scale = config.head_dim**-0.5
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split_sizes = [q_size, kv_size, kv_size]
        self.qkv_proj = nn.Linear(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = nn.Linear(q_size, config.hidden_size, bias=config.attention_output_bias)

    def forward(
        self,
        hidden: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, D/2]
        sin: torch.Tensor,  # [T, D/2]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D], this layer's view of the pool
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden]
        num_tokens = hidden.shape[0]
        qkv = self.ops.linear(hidden, self.qkv_proj)  # [T, (H + 2 Hkv) D]
        q_size, kv_size, _ = self.split_sizes
        # q and k rotated in one call straight from the fused projection (no copies before it).
        query_key = qkv[:, : q_size + kv_size].view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim)
        query_key = self.ops.rotary(query_key, cos, sin)  # [T, H + Hkv, D] contiguous
        q, k = query_key[:, : self.num_heads], query_key[:, self.num_heads :]  # strided views
        v = qkv[:, q_size + kv_size :].view(num_tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D] strided
        self.backend.write_kv_cache(k, v, kv_cache, metadata.slot_mapping)
        out = self.backend.paged_attention(q, kv_cache, metadata, self.scale)  # [T, H, D]
        return self.ops.linear(out.reshape(num_tokens, self.num_heads * self.head_dim), self.o_proj)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, ops: ModelOps):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.self_attn = Attention(config, backend, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, ops)

    def forward(self, hidden, residual, cos, sin, kv_cache, metadata):
        """vLLM-style residual stream: each RMSNorm also adds the residual (hidden, residual: [T, hidden],
        residual None in the first layer). Returns (block output, residual) whose sum is the layer's
        output, rounded to the activation dtype exactly as `residual + block(norm(residual))` is."""
        if residual is None:
            residual, normed = hidden, self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm(hidden, residual)
        attended = self.self_attn(normed, cos, sin, kv_cache, metadata)
        normed, residual = self.post_attention_layernorm(attended, residual)
        return self.mlp(normed), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, backend: AttentionBackend, ops: ModelOps):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, backend, ops) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, attention_backend: AttentionBackend):
        super().__init__()
        self.config = config
        # Triton attention brings the Triton RMSNorm (+ residual), RoPE, SiLU-and-mul and GEMV kernels.
        self.ops = model_ops(attention_backend)
        self.model = LlamaModel(config, attention_backend, self.ops)
        self.rotary = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(
            config.hidden_size, config.vocab_size, bias=False
        )
        self.attention_backend = attention_backend

    def forward(
        self,
        input_ids: torch.Tensor,  # [T] int64
        positions: torch.Tensor,  # [T] int64, position of each token in its own sequence
        kv_cache: torch.Tensor,  # [L, 2, num_blocks, block_size, Hkv, D]
        metadata: AttentionMetadata,
    ) -> torch.Tensor:  # [T, hidden], final-normed hidden states
        expected = (self.config.num_hidden_layers, 2)
        if tuple(kv_cache.shape[:2]) != expected or kv_cache.shape[4:] != (
            self.config.num_key_value_heads, self.config.head_dim
        ):
            raise ValueError(
                f"kv_cache shape {tuple(kv_cache.shape)} does not fit the model: want "
                f"[{expected[0]}, 2, num_blocks, block_size, {self.config.num_key_value_heads}, "
                f"{self.config.head_dim}]"
            )
        hidden = self.model.embed_tokens(input_ids)  # [T, hidden]
        cos, sin = self.rotary(positions, hidden.dtype)
        residual = None
        for layer_index, layer in enumerate(self.model.layers):
            hidden, residual = layer(hidden, residual, cos, sin, kv_cache[layer_index], metadata)
        return self.model.norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32, written into `out` ([N, vocab] float32) when given."""
        head = self.model.embed_tokens if self.lm_head is None else self.lm_head  # weight: [vocab, hidden]
        logits = self.ops.linear(hidden, head)
        if out is None:
            return logits.float()
        return out.copy_(logits)


def weight_names(config: ModelConfig) -> list[str]:
    """Every tensor name an HF checkpoint of this config must provide."""
    layer_tensors = ["input_layernorm.weight", "post_attention_layernorm.weight"]
    layer_tensors += [f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    layer_tensors += [f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    if config.attention_bias:
        layer_tensors += [f"self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
    if config.attention_output_bias:
        layer_tensors.append("self_attn.o_proj.bias")
    return decoder_weight_names(config, layer_tensors)


def parameter_slice(hf_name: str, config: ModelConfig) -> tuple[str, slice | None] | None:
    """An HF tensor name -> (our parameter name, the rows it fills, None for all); None: skip it."""
    if hf_name.endswith(IGNORED_WEIGHT_SUFFIXES) or (hf_name == "lm_head.weight" and config.tie_word_embeddings):
        return None
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    inter = config.intermediate_size
    stacked = {
        "self_attn.q_proj": ("self_attn.qkv_proj", slice(0, q_size)),
        "self_attn.k_proj": ("self_attn.qkv_proj", slice(q_size, q_size + kv_size)),
        "self_attn.v_proj": ("self_attn.qkv_proj", slice(q_size + kv_size, q_size + 2 * kv_size)),
        "mlp.gate_proj": ("mlp.gate_up_proj", slice(0, inter)),
        "mlp.up_proj": ("mlp.gate_up_proj", slice(inter, 2 * inter)),
    }
    for hf_part, (our_part, rows) in stacked.items():
        if f".{hf_part}." in hf_name:
            return hf_name.replace(hf_part, our_part), rows
    return hf_name, None


def _gguf_extra_config(gguf_architecture: str, tensor_names: set[str]) -> dict[str, Any]:
    """Llama GGUFs carry their attention bias as tensors only (Qwen2's is implied by its model_type)."""
    if gguf_architecture == "llama":
        return {"attention_bias": "blk.0.attn_q.bias" in tensor_names}
    return {}


GGUF = GGUFMapping(
    architectures={"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"},
    block_tensors={
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    },
    global_tensors={
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    },
    permuted_query_key=("llama",),  # llama.cpp's converter permutes Q/K of llama only, not qwen2
    extra_config=_gguf_extra_config,
)

FAMILY = ModelFamily(
    name="llama", architectures=ARCHITECTURES, parse_config=parse_config, build_model=LlamaForCausalLM,
    weight_names=weight_names, parameter_slice=parameter_slice, gguf=GGUF,
)
