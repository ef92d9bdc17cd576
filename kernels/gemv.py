"""Matrix-vector products for decode at tiny batch: y = x @ W^T (+ bias), x with at most 4 rows.

    x:      [num_rows, K]   num_rows in 1..MAX_ROWS (the tokens of a decode step)
    weight: [N, K]          row-major, nn.Linear's layout
    bias:   [N] or None
    out:    [num_rows, N]   x's dtype

At batch 1 a projection is a pure weight stream: every byte of W is read once and used for
num_rows multiply-adds, so the kernel's only job is to read W at copy bandwidth. Each program owns
BLOCK_N rows of W and walks K in BLOCK_K chunks with 16-byte loads along K (W rows are contiguous),
reducing each chunk against the x rows (which stay in L1/L2) into fp32 sums, one per x row. About
32 W elements per thread per chunk keep registers low, so several programs share an SM and keep
enough loads in flight; BLOCK_N shrinks until the grid covers the SMs a few times. The result (bias added in fp32) is
rounded once to x's dtype, as F.linear's fp32-accumulating GEMM rounds it.

    W:   rows n0 .. n0+BLOCK_N  (one program)
         | chunk 0 | chunk 1 | ... |   each chunk [BLOCK_N, BLOCK_K], streamed once
    x:   | chunk 0 | chunk 1 | ... |   [num_rows, BLOCK_K], re-read from cache by every program
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_utils import FLOAT_DTYPES, check_tensor, launch, num_multiprocessors

MAX_ROWS = 4  # rows of x one launch handles; larger batches belong to a GEMM
MIN_BLOCK_N = 4  # output rows per program, at least
MAX_BLOCK_K = 1024  # K elements per chunk: 2 KiB of a bf16 row, four 16-byte loads per lane of a warp
MAX_TILE = 8 * 32 * 32  # W elements per chunk: 8 warps x 32 lanes x 32 elements (four bf16 loads each)
PROGRAMS_PER_SM = 4  # BLOCK_N shrinks until the grid is this many times the SM count


@triton.jit
def _row_times_tile(
    x_row_ptrs,  # [BLOCK_K] this chunk of one row of x
    w,  # [BLOCK_N, BLOCK_K] the weight tile, fp32
    mask_k,  # [BLOCK_K] which K offsets exist (used unless EVEN_K)
    EVEN_K: tl.constexpr,
):  # -> [BLOCK_N] this chunk's partial sums for that row
    if EVEN_K:
        x = tl.load(x_row_ptrs).to(tl.float32)
    else:
        x = tl.load(x_row_ptrs, mask=mask_k, other=0.0).to(tl.float32)
    return tl.sum(w * x[None, :], axis=1)


@triton.jit
def _gemv_kernel(
    x_ptr,  # [NUM_ROWS, K], contiguous along K
    weight_ptr,  # [N, K], contiguous along K
    bias_ptr,  # [N] (unused unless HAS_BIAS)
    out_ptr,  # [NUM_ROWS, N], contiguous along N
    N,  # output features (rows of weight)
    K,  # input features
    stride_x,  # elements between rows of x
    stride_weight,  # elements between rows of weight
    stride_out,  # elements between rows of out
    NUM_ROWS: tl.constexpr,  # rows of x, 1..4; each gets its own accumulator
    HAS_BIAS: tl.constexpr,  # add bias[n] before rounding
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: chunk loads need no mask
    BLOCK_N: tl.constexpr,  # rows of weight per program, a power of two
    BLOCK_K: tl.constexpr,  # K elements per chunk, a power of two
):
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    # Rows past N re-read row N - 1 instead of masking: loads stay unmasked (vectorised) along K,
    # and the store below drops those rows.
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    weight_ptrs = weight_ptr + rows[:, None] * stride_weight + offs_k[None, :]  # [BLOCK_N, BLOCK_K]
    x_ptrs = x_ptr + offs_k  # row 0 of x; row m is + m * stride_x
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K  # [BLOCK_K]; dropped by the compiler when EVEN_K
        if EVEN_K:
            w = tl.load(weight_ptrs, eviction_policy="evict_first").to(tl.float32)
        else:
            w = tl.load(weight_ptrs, mask=mask_k[None, :], other=0.0, eviction_policy="evict_first").to(tl.float32)
        acc0 += _row_times_tile(x_ptrs, w, mask_k, EVEN_K)
        # Constant conditions: each NUM_ROWS compiles to exactly its own number of products.
        if NUM_ROWS > 1:
            acc1 += _row_times_tile(x_ptrs + stride_x, w, mask_k, EVEN_K)
        if NUM_ROWS > 2:
            acc2 += _row_times_tile(x_ptrs + 2 * stride_x, w, mask_k, EVEN_K)
        if NUM_ROWS > 3:
            acc3 += _row_times_tile(x_ptrs + 3 * stride_x, w, mask_k, EVEN_K)
        weight_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows).to(tl.float32)
        acc0 += bias
        acc1 += bias
        acc2 += bias
        acc3 += bias
    dtype = out_ptr.dtype.element_ty
    mask_n = offs_n < N
    tl.store(out_ptr + offs_n, acc0.to(dtype), mask=mask_n)
    if NUM_ROWS > 1:
        tl.store(out_ptr + stride_out + offs_n, acc1.to(dtype), mask=mask_n)
    if NUM_ROWS > 2:
        tl.store(out_ptr + 2 * stride_out + offs_n, acc2.to(dtype), mask=mask_n)
    if NUM_ROWS > 3:
        tl.store(out_ptr + 3 * stride_out + offs_n, acc3.to(dtype), mask=mask_n)


def _block_sizes(num_features: int, num_inputs: int, device: torch.device) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps). A wide chunk keeps many bytes of W in flight per program; BLOCK_N
    starts at what fills MAX_TILE and halves while the grid has fewer than PROGRAMS_PER_SM programs per
    SM, so a 4096-row projection still spreads over every SM several times. Each thread loads about
    32 elements of W per chunk, which keeps registers low enough for several programs per SM."""
    block_k = min(MAX_BLOCK_K, max(64, triton.next_power_of_2(num_inputs)))
    block_n = max(MIN_BLOCK_N, MAX_TILE // block_k)
    target_programs = PROGRAMS_PER_SM * num_multiprocessors(device)
    while block_n > MIN_BLOCK_N and triton.cdiv(num_features, block_n) < target_programs:
        block_n //= 2
    num_warps = max(1, min(8, block_n * block_k // (32 * 32)))
    return block_n, block_k, num_warps


def _check_out(out: torch.Tensor | None, num_rows: int, num_features: int, x: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.empty((num_rows, num_features), dtype=x.dtype, device=x.device)
    check_tensor("out", out, ndim=2, dtypes=(x.dtype,), device=x.device)
    if tuple(out.shape) != (num_rows, num_features):
        raise ValueError(f"out must have shape {(num_rows, num_features)}, got {tuple(out.shape)}")
    return out


def gemv(
    x: torch.Tensor,  # [num_rows, K], num_rows <= MAX_ROWS; may have a row stride
    weight: torch.Tensor,  # [N, K], contiguous along K (nn.Linear.weight)
    bias: torch.Tensor | None = None,  # [N]
    out: torch.Tensor | None = None,  # [num_rows, N], x's dtype, contiguous along N
) -> torch.Tensor:  # [num_rows, N]
    """x @ weight.T + bias with fp32 accumulation, written into `out` when given (else a new tensor)."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("weight", weight, ndim=2, dtypes=(x.dtype,), device=x.device)
    num_rows, num_inputs = x.shape
    num_features = weight.shape[0]
    if num_rows > MAX_ROWS:
        raise ValueError(f"x must have at most {MAX_ROWS} rows (use a GEMM for more), got {num_rows}")
    if weight.shape[1] != num_inputs:
        raise ValueError(f"weight must have {num_inputs} columns (x's K), got shape {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1, dtypes=(x.dtype,), device=x.device)
        if bias.shape[0] != num_features:
            raise ValueError(f"bias must have {num_features} elements (weight's rows), got {bias.shape[0]}")
    out = _check_out(out, num_rows, num_features, x)
    if num_rows == 0 or num_features == 0:
        return out
    if num_inputs == 0:
        return out.copy_(bias.expand_as(out)) if bias is not None else out.zero_()
    block_n, block_k, num_warps = _block_sizes(num_features, num_inputs, x.device)
    launch(
        _gemv_kernel, (triton.cdiv(num_features, block_n),), x.device,
        x, weight, bias if bias is not None else weight, out,
        num_features, num_inputs, x.stride(0), weight.stride(0), out.stride(0),
        NUM_ROWS=num_rows,
        HAS_BIAS=bias is not None,
        EVEN_K=num_inputs % block_k == 0,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out
