"""The Triton attention backend: KV write plus decode or prefill attention chosen per step.

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
    """Decode steps (one token per sequence) take the GQA decode kernel; anything else prefill."""
    if metadata.is_decode:
        return paged_decode_attention(query, kv_cache, metadata, scale)
    return prefill_attention(query, kv_cache, metadata, scale)


TRITON = AttentionBackend("triton", write_kv_cache_triton, paged_attention_triton)
