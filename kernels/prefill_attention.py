"""Causal prefill attention of packed variable-length queries over the paged KV pool.

The new tokens' K/V are already written into the pool, so K/V are always read through the block
table; a sequence's context may start with prior tokens (chunked prefill, reused prefix blocks):

    context of seq i:  [ prior_len tokens already cached | query_len new tokens ]
    query row j (0-based) sits at position prior_len + j and attends to positions 0 .. prior_len + j

Grid: (query blocks of BLOCK_M rows, query heads, sequences). A program streams K/V tiles of
BLOCK_N tokens with an fp32 online softmax (FlashAttention-2); only tiles that reach past the
first row's position need the causal mask, and tiles past the last row's position are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.paged_tiles import load_kv_tile, online_softmax_update
from kernels.launch_utils import (
    check_attention_inputs,
    check_out,
    dot_operand_dtype,
    dot_precision,
    launch,
)

LOG2_E = 1.4426950408889634


# The block-table width follows the step's longest context: specialising on it would compile a
# variant per width class (1, multiple of 16, other) for nothing measurable.
@triton.jit(do_not_specialize=["stride_block_table"])
def _prefill_attention_kernel(
    query_ptr,  # [num_tokens, num_heads, head_dim] packed new tokens of all sequences
    key_cache_ptr,  # [num_blocks * block_size, num_kv_heads, head_dim] (kv_cache[0], contiguous)
    value_cache_ptr,  # same shape (kv_cache[1])
    block_tables_ptr,  # [num_seqs, max_num_blocks]
    query_start_locs_ptr,  # [num_seqs + 1]
    context_lens_ptr,  # [num_seqs]
    out_ptr,  # [num_tokens, num_heads, head_dim]
    qk_scale,  # softmax scale * log2(e): scores live in the log2 domain so exp2 can be used
    stride_query_token,
    stride_query_head,
    stride_block_table,  # entries per block-table row (the step's widest table): not specialised
    stride_out_token,
    stride_out_head,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,  # >= 16 and a power of two
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block of the pool
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # context tokens per loop iteration
    DOT_DTYPE: tl.constexpr,  # tl.dot operand dtype (see launch_utils.dot_operand_dtype)
    DOT_PRECISION: tl.constexpr,
):
    m_block = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    query_start = tl.load(query_start_locs_ptr + seq)
    query_len = tl.load(query_start_locs_ptr + seq + 1) - query_start
    first_row = m_block * BLOCK_M
    if first_row >= query_len:
        return  # this sequence has fewer query blocks than the longest one
    context_len = tl.load(context_lens_ptr + seq)
    prior_len = context_len - query_len
    kv_head = head // GROUP

    offs_m = first_row + tl.arange(0, BLOCK_M)  # [BLOCK_M] query rows within the sequence
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    m_mask = offs_m < query_len
    d_mask = offs_d < HEAD_DIM
    tokens = (query_start + offs_m).to(tl.int64)  # [BLOCK_M] packed token ids
    q = tl.load(
        query_ptr + tokens[:, None] * stride_query_token + head * stride_query_head + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(DOT_DTYPE)  # [BLOCK_M, HEAD_DIM_PAD]
    row_positions = prior_len + offs_m  # [BLOCK_M]; rows past query_len only see valid positions

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of 2^(s - m_i)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_block_table
    kv_end = tl.minimum(context_len, prior_len + first_row + BLOCK_M)  # the last row's position + 1
    mask_from = prior_len + first_row + 1  # tiles ending at or before this see no masked position
    for tile_start in range(0, kv_end, BLOCK_N):
        positions = tile_start + offs_n  # [BLOCK_N]
        n_mask = positions < kv_end
        k, v = load_kv_tile(table_row, key_cache_ptr, value_cache_ptr, positions, n_mask, kv_head, offs_d, d_mask,
                            BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, DOT_DTYPE)  # [BLOCK_N, HEAD_DIM_PAD] each

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_M, BLOCK_N]
        if tile_start + BLOCK_N > mask_from:
            is_visible = (positions[None, :] <= row_positions[:, None]) & n_mask[None, :]
            s = tl.where(is_visible, s, float("-inf"))
        # m_i stays finite: position 0 is visible to every row
        m_i, l_i, acc = online_softmax_update(s, v, m_i, l_i, acc, value_cache_ptr, DOT_DTYPE, DOT_PRECISION)

    acc = acc / l_i[:, None]
    out_rows = out_ptr + tokens[:, None] * stride_out_token + head * stride_out_head
    tl.store(out_rows + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def default_block_sizes(head_dim: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int, int, int]:
    """(block_m, block_n, num_warps, num_stages): FlashAttention-2-like tiles for H100-class GPUs."""
    if device.type != "cuda":
        return 32, 32, 4, 1  # interpreter: fewer, larger tiles are faster
    if dtype == torch.float32:
        return 64, 32, 4, 2  # fp32 K/V tiles are twice the shared memory
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 3


def prefill_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim] packed as query_start_locs says
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], new KV already written
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks] int32: each sequence's blocks, padded
    query_start_locs: torch.Tensor,  # [num_seqs + 1] int32: sequence i owns query rows [start_i, start_i+1)
    context_lens: torch.Tensor,  # [num_seqs] int32: tokens of KV each sequence attends to (incl. new)
    max_query_len: int,  # >= every sequence's new tokens (host int: it sizes the grid)
    scale: float,
    *,
    block_m: int | None = None,  # query rows per program (power of two >= 16); None: default_block_sizes
    block_n: int | None = None,  # context tokens per iteration (power of two >= 16)
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim], query dtype
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Causal attention of each sequence's new tokens over its whole paged context."""
    default_m, default_n, num_warps, num_stages = default_block_sizes(query.shape[-1], query.dtype, query.device)
    block_m = default_m if block_m is None else block_m
    block_n = default_n if block_n is None else block_n
    check_attention_inputs(query, kv_cache, block_tables, context_lens, block_n, query_start_locs)
    if block_m < 16 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {block_m}")
    out = check_out(out, query)
    num_tokens, num_heads, head_dim = query.shape
    num_seqs, num_kv_heads = context_lens.shape[0], kv_cache.shape[3]
    if num_tokens == 0 or num_seqs == 0:
        return out
    grid = (triton.cdiv(max_query_len, block_m), num_heads, num_seqs)
    launch(
        _prefill_attention_kernel, grid, query.device,
        query, kv_cache[0], kv_cache[1], block_tables, query_start_locs,
        context_lens, out, scale * LOG2_E,
        query.stride(0), query.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_DTYPE=dot_operand_dtype(query.dtype, query.device),
        DOT_PRECISION=dot_precision(query.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
