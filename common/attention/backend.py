"""Picks the attention implementation: PyTorch reference on CPU, Triton kernels on CUDA.

The kernels (`kernels/`) take plain tensors and ints; a backend adapts a step's `AttentionMetadata`
to them. A mixed step (running decodes first, then prompt chunks) runs both paths into one output:
the decode path on the leading one-token rows, the prefill path on the rest, each with its own part
of the metadata:

    query rows:  [ d0 | d1 | d2 | chunk of prompt A ... | chunk of prompt B ... ]
                 <- decode_part -><------------- prefill_part ------------------>
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from common.attention.metadata import AttentionMetadata
from kernels.reference import decode_attention_reference, prefill_attention_reference, write_kv_cache_reference

BACKEND_NAMES = ("auto", "reference", "triton")

# (query [T, H, D], kv_cache [2, NB, BS, Hkv, D], metadata, scale, out [T, H, D] or None) -> out or a new [T, H, D]
PathAttention = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, float, Optional[torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    # (key [T, Hkv, D], value [T, Hkv, D], kv_cache [2, NB, BS, Hkv, D], slot_mapping [T]) -> None
    write_kv_cache: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
    decode_attention: PathAttention  # every sequence of the metadata has exactly one new token
    prefill_attention: PathAttention  # any query lengths

    def paged_attention(
        self,
        query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
        kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], new KV already written
        metadata: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
        """Decode steps take the decode path, prefill steps the prefill path, mixed steps both."""
        if metadata.is_decode:
            return self.decode_attention(query, kv_cache, metadata, scale, None)
        if not metadata.is_mixed:
            return self.prefill_attention(query, kv_cache, metadata, scale, None)
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)  # [T, H, D]
        num_decode_tokens = metadata.num_decode_tokens
        self.decode_attention(query[:num_decode_tokens], kv_cache, metadata.decode_part, scale,
                              out[:num_decode_tokens])
        self.prefill_attention(query[num_decode_tokens:], kv_cache, metadata.prefill_part, scale,
                               out[num_decode_tokens:])
        return out


def _into(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def _reference_decode(query, kv_cache, metadata: AttentionMetadata, scale: float, out=None) -> torch.Tensor:
    return _into(out, decode_attention_reference(query, kv_cache, metadata.block_tables, metadata.context_lens,
                                                 metadata.max_context_len, scale))


def _reference_prefill(query, kv_cache, metadata: AttentionMetadata, scale: float, out=None) -> torch.Tensor:
    starts = metadata.query_start_locs_cpu or metadata.query_start_locs.tolist()
    context_lens = metadata.context_lens_cpu or metadata.context_lens.tolist()
    return _into(out, prefill_attention_reference(query, kv_cache, metadata.block_tables, starts, context_lens,
                                                  scale))


REFERENCE = AttentionBackend("reference", write_kv_cache_reference, _reference_decode, _reference_prefill)


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """`auto` means Triton on CUDA and the reference elsewhere."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"attention backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "reference" or (name == "auto" and device.type != "cuda"):
        return REFERENCE
    from common.attention.triton_backend import TRITON  # imported lazily: Triton is only needed on this path

    return TRITON
