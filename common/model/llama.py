"""One decoder for Llama, Qwen2 and Mistral over the paged KV pool.

The forward pass takes a flat batch of new tokens from any number of sequences (packed prefill,
decode, or a mix) and never sees sequences itself: where each token's K/V goes and what it attends
to is all in `AttentionMetadata`, handled by the attention backend.

Parameter names mirror transformers' (`model.layers.3.self_attn...`), except that q/k/v are fused
into `qkv_proj` and gate/up into `gate_up_proj`; `load_weights` stacks the HF tensors into them.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from common.attention import AttentionBackend, AttentionMetadata
from common.model.config import ModelConfig
from common.model.layers import RMSNorm, RotaryEmbedding, SwiGLUMLP
from common.model.ops import ModelOps, model_ops

# Checkpoint tensors that carry no learned state.
IGNORED_WEIGHT_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightLoadError(ValueError):
    """The checkpoint does not fit the model: missing, unexpected or mis-shaped tensors."""


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

    def hf_weight_names(self) -> list[str]:
        """Every tensor name an HF checkpoint of this config must provide."""
        config = self.config
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not config.tie_word_embeddings:
            names.append("lm_head.weight")
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}"
            names += [f"{prefix}.input_layernorm.weight", f"{prefix}.post_attention_layernorm.weight"]
            names += [f"{prefix}.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
            names += [f"{prefix}.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
            if config.attention_bias:
                names += [f"{prefix}.self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
            if config.attention_output_bias:
                names.append(f"{prefix}.self_attn.o_proj.bias")
        return names

    def _target_slice(self, hf_name: str) -> tuple[str, slice | None]:
        """Maps an HF tensor name to (our parameter name, rows of it), rows None meaning all."""
        q_size = self.config.num_attention_heads * self.config.head_dim
        kv_size = self.config.num_key_value_heads * self.config.head_dim
        inter = self.config.intermediate_size
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

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies HF-named tensors into the model (cast to its dtype/device); all must be present."""
        params = dict(self.named_parameters())
        expected = set(self.hf_weight_names())
        loaded: set[str] = set()
        unexpected: list[str] = []
        for hf_name, tensor in weights:
            if hf_name.endswith(IGNORED_WEIGHT_SUFFIXES) or (
                hf_name == "lm_head.weight" and self.config.tie_word_embeddings
            ):
                continue
            our_name, rows = self._target_slice(hf_name)
            if hf_name not in expected or our_name not in params:
                unexpected.append(hf_name)
                continue
            target = params[our_name].data if rows is None else params[our_name].data[rows]
            if tuple(target.shape) != tuple(tensor.shape):
                raise WeightLoadError(
                    f"weight {hf_name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
                )
            target.copy_(tensor)
            loaded.add(hf_name)
        if unexpected:
            raise WeightLoadError(
                f"checkpoint has {len(unexpected)} unexpected tensors: {sorted(unexpected)[:10]}"
            )
        missing = sorted(expected - loaded)
        if missing:
            raise WeightLoadError(f"checkpoint is missing {len(missing)} tensors: {missing[:10]}")
