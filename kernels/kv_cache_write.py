"""Scatters the new tokens' K and V into their slots of the paged KV pool.

One program copies one token: all its KV heads, for K and for V. The slot of token t is
`slot_mapping[t] = block_id * block_size + offset_in_block`, and because the pool is contiguous
the slot is also the row index of the flattened [num_blocks * block_size, num_kv_heads, head_dim]
view, so no block arithmetic is needed here. Matches `kernels.reference.write_kv_cache_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_utils import FLOAT_DTYPES, INDEX_DTYPES, check_kv_cache, check_tensor, launch


@triton.jit
def _write_kv_cache_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_dim]
    value_ptr,  # [num_tokens, num_kv_heads, head_dim]
    key_cache_ptr,  # [num_blocks * block_size, num_kv_heads, head_dim] (kv_cache[0], contiguous)
    value_cache_ptr,  # same shape (kv_cache[1])
    slot_mapping_ptr,  # [num_tokens] flat slot of each token
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,  # NUM_KV_HEADS rounded up to a power of two
    HEAD_DIM_PAD: tl.constexpr,  # HEAD_DIM rounded up to a power of two
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    offs_h = tl.arange(0, HEADS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)  # [HEADS_PAD, HEAD_DIM_PAD]
    cache_offsets = slot * (NUM_KV_HEADS * HEAD_DIM) + offs_h[:, None] * HEAD_DIM + offs_d[None, :]

    key = tl.load(
        key_ptr + token * stride_key_token + offs_h[:, None] * stride_key_head + offs_d[None, :], mask=mask
    )
    tl.store(key_cache_ptr + cache_offsets, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    value = tl.load(
        value_ptr + token * stride_value_token + offs_h[:, None] * stride_value_head + offs_d[None, :], mask=mask
    )
    tl.store(value_cache_ptr + cache_offsets, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_kv_cache(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], contiguous
    slot_mapping: torch.Tensor,  # [num_tokens] int64 (or int32); every slot in range
) -> None:
    """Writes key/value into kv_cache in place, casting to the cache dtype."""
    check_tensor("key", key, ndim=3, dtypes=FLOAT_DTYPES)
    num_tokens, num_kv_heads, head_dim = key.shape
    check_tensor("value", value, ndim=3, dtypes=FLOAT_DTYPES, device=key.device)
    if value.shape != key.shape:
        raise ValueError(f"value shape {tuple(value.shape)} differs from key shape {tuple(key.shape)}")
    check_kv_cache(kv_cache, num_kv_heads, head_dim)
    if kv_cache.device != key.device:
        raise ValueError(f"kv_cache is on {kv_cache.device}, key on {key.device}")
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=INDEX_DTYPES, device=key.device)
    if slot_mapping.shape[0] != num_tokens:
        raise ValueError(f"slot_mapping has {slot_mapping.shape[0]} slots for {num_tokens} tokens")
    if num_tokens == 0:
        return
    launch(
        _write_kv_cache_kernel, (num_tokens,), key.device,
        key,
        value,
        kv_cache[0],
        kv_cache[1],
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
    )
