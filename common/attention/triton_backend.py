"""The Triton attention backend: the kernels of `kernels/`, fed from a step's AttentionMetadata.

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


def decode_attention_triton(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], new KV already written
    metadata: AttentionMetadata,  # is_decode
    scale: float,
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim]
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """The GQA decode kernel (split-KV when the batch leaves the GPU under-occupied)."""
    if not metadata.is_decode:
        raise ValueError("decode attention needs one query token per sequence (metadata.is_decode)")
    return paged_decode_attention(query, kv_cache, metadata.block_tables, metadata.context_lens,
                                  metadata.max_context_len, scale, out=out)


def prefill_attention_triton(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim], packed as metadata.query_start_locs says
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], new KV already written
    metadata: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """The causal prefill kernel over packed ragged queries; checks the packing on the host copy."""
    starts = metadata.query_start_locs_cpu
    if starts is not None and starts[-1] != query.shape[0]:
        raise ValueError(f"query has {query.shape[0]} tokens, metadata.query_start_locs ends at {starts[-1]}")
    return prefill_attention(query, kv_cache, metadata.block_tables, metadata.query_start_locs, metadata.context_lens,
                             metadata.max_query_len, scale, out=out)


# write: (key [T, Hkv, D], value [T, Hkv, D], kv_cache [2, NB, BS, Hkv, D], slot_mapping [T]) -> None
TRITON = AttentionBackend("triton", write_kv_cache, decode_attention_triton, prefill_attention_triton)
