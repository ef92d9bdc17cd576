"""Pieces shared by the paged attention kernels: a K/V tile read through a block table, and one step
of the online softmax (flash attention's running max / sum / accumulator, in the log2 domain).

    position p of a sequence ─► block_ids = table_row[p // BLOCK_SIZE] ─► slot = block_id * BLOCK_SIZE + p % BLOCK_SIZE
    K/V cache element (slot, kv_head, d) sits at (slot * NUM_KV_HEADS + kv_head) * HEAD_DIM + d
"""

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(
    table_row,  # pointer to this sequence's block-table row
    key_cache_ptr,  # [num_blocks * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM] flat view of the K half
    value_cache_ptr,  # same layout, V half
    positions,  # [BLOCK_N] token positions of the tile
    n_mask,  # [BLOCK_N] which positions exist
    kv_head,  # the KV head read
    offs_d,  # [HEAD_DIM_PAD] head-dim offsets
    d_mask,  # [HEAD_DIM_PAD] which offsets are < HEAD_DIM
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # dtype the tile is cast to for tl.dot
):
    block_ids = tl.load(table_row + positions // BLOCK_SIZE, mask=n_mask, other=0).to(tl.int64)
    slots = block_ids * BLOCK_SIZE + positions % BLOCK_SIZE
    kv_offsets = (slots[:, None] * NUM_KV_HEADS + kv_head) * HEAD_DIM + offs_d[None, :]
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(key_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)  # [BLOCK_N, HEAD_DIM_PAD]
    v = tl.load(value_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(DOT_DTYPE)
    return k, v


@triton.jit
def online_softmax_update(
    s,  # [ROWS, BLOCK_N] scores of this tile, log2 domain, -inf where hidden
    v,  # [BLOCK_N, HEAD_DIM_PAD] values of this tile
    m_i,  # [ROWS] running max
    l_i,  # [ROWS] running sum of 2^(s - m_i)
    acc,  # [ROWS, HEAD_DIM_PAD] running weighted sum of values, fp32
    value_cache_ptr,  # only its element type: probabilities are rounded to it, as the values are
    DOT_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    p = tl.exp2(s - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    p = p.to(value_cache_ptr.dtype.element_ty).to(DOT_DTYPE)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc
