"""Decode attention over the paged KV pool: one new query token per sequence.

One program owns one (sequence, KV head) and all `group = num_heads // num_kv_heads` query heads
that read it, so every KV head is loaded from memory once per step (decode is bandwidth bound).
The group is padded to 16 rows so the scores are a tensor-core `tl.dot`:

    q     [GROUP_PAD, D]      (rows >= group are masked)
    K^T   [D, BLOCK_N]        BLOCK_N context tokens gathered through the block table
    s     [GROUP_PAD, BLOCK_N] -> online softmax in fp32 -> acc [GROUP_PAD, D]

Split-KV (flash-decoding): with few sequences the grid above has fewer programs than the GPU has
SMs, and each program streams a long context alone. The context is then cut into `num_splits`
partitions of `partition_size` tokens; each (sequence, KV head, partition) program writes its
normalised partial output and log2-sum-exp, and `_reduce_splits_kernel` merges them:

    out = sum_p 2^(lse_p - M) * out_p / sum_p 2^(lse_p - M),   M = max_p lse_p

The split plan follows max_context_len (a host int). Under CUDA-graph capture, pass the largest
context the graph will replay (or num_splits=1): partitions past the captured plan would never run.
The single-pass kernel does not depend on max_context_len.
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
    num_multiprocessors,
)

LOG2_E = 1.4426950408889634
MIN_PARTITION_SIZE = 256  # tokens; shorter partitions cost more in the reduce than they save
PROGRAMS_PER_SM = 4  # split until the grid has about this many programs per SM
SPLIT_BLOCK = 32  # partitions the reduce merges per iteration; fixed, so no split count adds a variant


# The block-table width follows the step's longest context: specialising on it would compile a
# variant per width class (1, multiple of 16, other) for nothing measurable.
@triton.jit(do_not_specialize=["stride_block_table"])
def _paged_decode_kernel(
    query_ptr,  # [num_seqs, num_heads, head_dim]
    key_cache_ptr,  # [num_blocks * block_size, num_kv_heads, head_dim] (kv_cache[0], contiguous)
    value_cache_ptr,  # same shape (kv_cache[1])
    block_tables_ptr,  # [num_seqs, max_num_blocks]
    context_lens_ptr,  # [num_seqs]
    out_ptr,  # IS_SPLIT: [num_seqs, num_heads, num_splits, head_dim] fp32, contiguous
    #           else: [num_seqs, num_heads, head_dim] in the query dtype
    lse_ptr,  # IS_SPLIT: [num_seqs, num_heads, num_splits] fp32 log2-sum-exp, contiguous; else unused
    qk_scale,  # softmax scale * log2(e): scores live in the log2 domain so exp2 can be used
    partition_size,  # tokens per split (a multiple of BLOCK_N, so always divisible by 16); 2**30 when not split
    stride_query_seq,
    stride_query_head,
    stride_block_table,  # entries per block-table row (the step's widest table): not specialised
    stride_out_seq,
    stride_out_head,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,  # query heads per KV head
    GROUP_PAD: tl.constexpr,  # >= 16 and a power of two (tl.dot minimum)
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # tokens per KV block of the pool
    BLOCK_N: tl.constexpr,  # context tokens per loop iteration
    IS_SPLIT: tl.constexpr,
    DOT_DTYPE: tl.constexpr,  # tl.dot operand dtype (see launch_utils.dot_operand_dtype)
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = split * partition_size
    if start >= context_len:
        return  # empty partition: the reduce never reads it
    end = tl.minimum(start + partition_size, context_len)

    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    head_ids = kv_head * GROUP + offs_g  # [GROUP_PAD] query heads of this KV head
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        query_ptr + seq.to(tl.int64) * stride_query_seq + head_ids[:, None] * stride_query_head + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(DOT_DTYPE)  # [GROUP_PAD, HEAD_DIM_PAD]

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)  # running max (log2 domain)
    l_i = tl.zeros([GROUP_PAD], tl.float32)  # running sum of 2^(s - m_i)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    table_row = block_tables_ptr + seq.to(tl.int64) * stride_block_table
    for tile_start in range(start, end, BLOCK_N):
        positions = tile_start + offs_n  # [BLOCK_N]
        n_mask = positions < end
        k, v = load_kv_tile(table_row, key_cache_ptr, value_cache_ptr, positions, n_mask, kv_head, offs_d, d_mask,
                            BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, DOT_DTYPE)  # [BLOCK_N, HEAD_DIM_PAD] each

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [GROUP_PAD, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_i, l_i, acc = online_softmax_update(s, v, m_i, l_i, acc, value_cache_ptr, DOT_DTYPE, DOT_PRECISION)

    acc = acc / l_i[:, None]
    out_mask = g_mask[:, None] & d_mask[None, :]
    if IS_SPLIT:
        num_splits = tl.num_programs(2)
        rows = (seq.to(tl.int64) * NUM_KV_HEADS * GROUP + head_ids) * num_splits + split  # [GROUP_PAD]
        tl.store(out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=out_mask)
        tl.store(lse_ptr + rows, m_i + tl.log2(l_i), mask=g_mask)
    else:
        out_rows = out_ptr + seq.to(tl.int64) * stride_out_seq + head_ids[:, None] * stride_out_head
        tl.store(out_rows + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=["num_splits"])
def _reduce_splits_kernel(
    partial_out_ptr,  # [num_seqs, num_heads, num_splits, head_dim] fp32, contiguous
    lse_ptr,  # [num_seqs, num_heads, num_splits] fp32, contiguous
    context_lens_ptr,  # [num_seqs]
    out_ptr,  # [num_seqs, num_heads, head_dim]
    partition_size,  # as in _paged_decode_kernel
    num_splits,  # partitions per (sequence, head) in the workspace: varies with the step, not specialised
    stride_out_seq,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    SPLIT_BLOCK: tl.constexpr,  # partitions merged per loop iteration
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    num_valid_splits = tl.cdiv(context_len, partition_size)  # later partitions were never written
    first_row = (seq.to(tl.int64) * tl.num_programs(1) + head) * num_splits
    offs_s = tl.arange(0, SPLIT_BLOCK)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = offs_d < HEAD_DIM

    running_max = tl.full([SPLIT_BLOCK], float("-inf"), tl.float32)
    for split_start in range(0, num_valid_splits, SPLIT_BLOCK):
        s_mask = split_start + offs_s < num_valid_splits
        lse = tl.load(lse_ptr + first_row + split_start + offs_s, mask=s_mask, other=float("-inf"))
        running_max = tl.maximum(running_max, lse)
    global_max = tl.max(running_max, axis=0)

    weight_sums = tl.zeros([SPLIT_BLOCK], tl.float32)
    acc = tl.zeros([HEAD_DIM_PAD], tl.float32)
    for split_start in range(0, num_valid_splits, SPLIT_BLOCK):
        s_mask = split_start + offs_s < num_valid_splits
        rows = first_row + split_start + offs_s  # [SPLIT_BLOCK]
        lse = tl.load(lse_ptr + rows, mask=s_mask, other=float("-inf"))
        weights = tl.exp2(lse - global_max)  # 0 for masked partitions
        partial = tl.load(
            partial_out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :],
            mask=s_mask[:, None] & d_mask[None, :],
            other=0.0,
        )  # [SPLIT_BLOCK, HEAD_DIM_PAD]
        weight_sums += weights
        acc += tl.sum(weights[:, None] * partial, axis=0)
    acc = acc / tl.sum(weight_sums, axis=0)
    out_row = out_ptr + seq.to(tl.int64) * stride_out_seq + head * stride_out_head
    tl.store(out_row + offs_d, acc.to(out_ptr.dtype.element_ty), mask=d_mask)


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int:
    """Splits the context only while the (sequence, KV head) grid leaves the GPU under-occupied."""
    num_programs = num_seqs * num_kv_heads
    target_programs = PROGRAMS_PER_SM * num_sms
    if num_programs >= target_programs:
        return 1
    max_splits = max(1, max_context_len // MIN_PARTITION_SIZE)
    return min(triton.cdiv(target_programs, num_programs), max_splits)


def plan_partitions(max_context_len: int, num_splits: int, block_n: int = 64) -> tuple[int, int]:
    """(partition_size, num_splits actually used): partitions are whole tiles of block_n tokens."""
    partition_size = triton.cdiv(triton.cdiv(max_context_len, num_splits), block_n) * block_n
    return partition_size, triton.cdiv(max_context_len, partition_size)


def paged_decode_attention(
    query: torch.Tensor,  # [num_seqs, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim], new KV already written
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks] int32: each sequence's blocks, padded
    context_lens: torch.Tensor,  # [num_seqs] int32: tokens of KV each sequence attends to (incl. the new one)
    max_context_len: int,  # >= every context_len (host int: it sizes the split plan)
    scale: float,
    *,
    num_splits: int | None = None,  # None: choose_num_splits; 1 forces the single-pass kernel
    block_n: int = 64,  # context tokens per inner iteration (power of two >= 16)
    out: torch.Tensor | None = None,  # [num_seqs, num_heads, head_dim], query dtype
) -> torch.Tensor:  # [num_seqs, num_heads, head_dim]
    """Attention of each sequence's single new token over its whole paged context."""
    check_attention_inputs(query, kv_cache, block_tables, context_lens, block_n)
    if query.shape[0] != context_lens.shape[0]:
        raise ValueError(f"decode attention needs one query token per sequence, got {query.shape[0]} "
                         f"tokens for {context_lens.shape[0]} sequences")
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    out = check_out(out, query)
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = kv_cache.shape[3]
    if num_seqs == 0:
        return out
    if num_splits is None:
        num_splits = choose_num_splits(
            num_seqs, num_kv_heads, max_context_len, num_multiprocessors(query.device)
        )
    partition_size, num_splits = plan_partitions(max_context_len, num_splits, block_n)
    is_split = num_splits > 1
    if is_split:
        partial_out, lse = _new_split_workspace(num_seqs, num_heads, num_splits, head_dim, query.device)
    else:
        partial_out, lse = out, out  # lse is unused by the single-pass kernel
        partition_size = 1 << 30  # one partition covers any context: no reliance on max_context_len
    group = num_heads // num_kv_heads
    launch(
        _paged_decode_kernel, (num_seqs, num_kv_heads, num_splits), query.device,
        query, kv_cache[0], kv_cache[1], block_tables, context_lens, partial_out, lse,
        scale * LOG2_E, partition_size,
        query.stride(0), query.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_KV_HEADS=num_kv_heads,
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=kv_cache.shape[2],
        BLOCK_N=block_n,
        IS_SPLIT=is_split,
        DOT_DTYPE=dot_operand_dtype(query.dtype, query.device),
        DOT_PRECISION=dot_precision(query.dtype),
    )
    if is_split:
        launch(
            _reduce_splits_kernel, (num_seqs, num_heads), query.device,
            partial_out, lse, context_lens, out, partition_size, num_splits,
            out.stride(0), out.stride(1),
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=triton.next_power_of_2(head_dim),
            SPLIT_BLOCK=SPLIT_BLOCK,
        )
    return out


def _new_split_workspace(num_seqs, num_heads, num_splits, head_dim, device):
    """Partial outputs [B, H, S, D] and log2-sum-exps [B, H, S], both fp32 (tests poison these)."""
    partial_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=device)
    lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=device)
    return partial_out, lse
