"""The Triton attention backend: KV write plus decode or prefill attention chosen per step.

A mixed step (running decodes first, then prompt chunks) runs both kernels into one output: the decode
kernel on the leading one-token rows, the prefill kernel on the rest, each with its own metadata part.

`common.attention.backend.get_attention_backend` imports `TRITON` from here lazily, so Triton is
only imported on that path. On CPU tensors the kernels run only when TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch

from common.attention.backend import AttentionBackend
from common.attention.metadata import AttentionMetadata
from kernels.kv_cache_write import write_kv_cache
from kernels.paged_decode_attention import paged_decode_attention
from kernels.prefill_attention import prefill_attention


# (key [T, Hkv, D], value [T, Hkv, D], kv_cache [2, NB, BS, Hkv, D], slot_mapping [T]) -> None
write_kv_cache_triton = write_kv_cache


def paged_attention_triton(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], new KV already written
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Decode steps (one token per sequence) take the GQA decode kernel, prefill steps the prefill kernel,
    mixed steps both."""
    if metadata.is_decode:
        return paged_decode_attention(query, kv_cache, metadata, scale)
    if not metadata.is_mixed:
        return prefill_attention(query, kv_cache, metadata, scale)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # [T, H, D]
    num_decode_tokens = metadata.num_decode_tokens
    paged_decode_attention(query[:num_decode_tokens], kv_cache, metadata.decode_part, scale,
                           out=out[:num_decode_tokens])
    prefill_attention(query[num_decode_tokens:], kv_cache, metadata.prefill_part, scale, out=out[num_decode_tokens:])
    return out


TRITON = AttentionBackend("triton", write_kv_cache_triton, paged_attention_triton)
