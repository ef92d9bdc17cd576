"""Rotary position embedding ("rotate_half" layout, as in transformers' Llama) for one token per program.

    x = [x1 | x2 | rest],  x1, x2: rotary_dim / 2 each,  rest: head_dim - rotary_dim (passed through)
    out = [x1 * cos - x2 * sin | x2 * cos + x1 * sin | rest]

cos/sin are per token ([num_tokens, rotary_dim / 2], computed once per step and shared by every
layer). Every product and sum is rounded to the activation dtype like the eager PyTorch expression,
so the result matches `kernels.reference.rotary_reference` exactly (in fp32 up to the GPU fusing a
multiply and an add).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_utils import FLOAT_DTYPES, check_tensor, launch


@triton.jit
def _rotary_kernel(
    x_ptr,  # [num_tokens, num_heads, head_dim]
    cos_ptr,  # [num_tokens, rotary_dim // 2]
    sin_ptr,  # [num_tokens, rotary_dim // 2]
    out_ptr,  # [num_tokens, num_heads, head_dim], contiguous
    stride_x_token,
    stride_x_head,
    stride_cos,
    stride_sin,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF: tl.constexpr,  # rotary_dim // 2
    HEADS_PAD: tl.constexpr,  # powers of two >= the sizes above
    HALF_PAD: tl.constexpr,
    REST_PAD: tl.constexpr,  # >= head_dim - rotary_dim (at least 1)
):
    token = tl.program_id(0).to(tl.int64)
    dtype = out_ptr.dtype.element_ty
    offs_h = tl.arange(0, HEADS_PAD)
    offs_i = tl.arange(0, HALF_PAD)
    i_mask = offs_i < HALF
    mask = (offs_h[:, None] < NUM_HEADS) & i_mask[None, :]  # [HEADS_PAD, HALF_PAD]
    cos = tl.load(cos_ptr + token * stride_cos + offs_i, mask=i_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + token * stride_sin + offs_i, mask=i_mask, other=0.0).to(tl.float32)
    x_rows = x_ptr + token * stride_x_token + offs_h[:, None] * stride_x_head
    x1 = tl.load(x_rows + offs_i[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + HALF + offs_i[None, :], mask=mask, other=0.0).to(tl.float32)

    # Round after each operation, as x1 * cos - x2 * sin does in the activation dtype.
    x1_cos = (x1 * cos[None, :]).to(dtype).to(tl.float32)
    x2_sin = (x2 * sin[None, :]).to(dtype).to(tl.float32)
    x2_cos = (x2 * cos[None, :]).to(dtype).to(tl.float32)
    x1_sin = (x1 * sin[None, :]).to(dtype).to(tl.float32)
    out_rows = out_ptr + token * (NUM_HEADS * HEAD_DIM) + offs_h[:, None] * HEAD_DIM
    tl.store(out_rows + offs_i[None, :], (x1_cos - x2_sin).to(dtype), mask=mask)
    tl.store(out_rows + HALF + offs_i[None, :], (x2_cos + x1_sin).to(dtype), mask=mask)

    offs_r = tl.arange(0, REST_PAD)
    rest_mask = (offs_h[:, None] < NUM_HEADS) & (offs_r[None, :] < HEAD_DIM - 2 * HALF)
    rest = tl.load(x_rows + 2 * HALF + offs_r[None, :], mask=rest_mask, other=0.0)
    tl.store(out_rows + 2 * HALF + offs_r[None, :], rest, mask=rest_mask)


def apply_rotary(
    x: torch.Tensor,  # [num_tokens, num_heads, head_dim]; may be a view of a fused QKV projection
    cos: torch.Tensor,  # [num_tokens, rotary_dim // 2], x's dtype
    sin: torch.Tensor,  # [num_tokens, rotary_dim // 2], x's dtype
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim], contiguous, x's dtype
    """Returns x with its first rotary_dim dims of every head rotated by its token's angles."""
    check_tensor("x", x, ndim=3, dtypes=FLOAT_DTYPES)
    num_tokens, num_heads, head_dim = x.shape
    for name, table in (("cos", cos), ("sin", sin)):
        check_tensor(name, table, ndim=2, dtypes=(x.dtype,), device=x.device)
        if table.shape[0] != num_tokens or not 0 < 2 * table.shape[1] <= head_dim:
            raise ValueError(
                f"{name} must be [num_tokens={num_tokens}, rotary_dim // 2] with rotary_dim <= head_dim "
                f"{head_dim}, got {tuple(table.shape)}"
            )
    if cos.shape != sin.shape:
        raise ValueError(f"cos shape {tuple(cos.shape)} differs from sin shape {tuple(sin.shape)}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    half = cos.shape[1]
    launch(
        _rotary_kernel, (num_tokens,), x.device,
        x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
        NUM_HEADS=num_heads,
        HEAD_DIM=head_dim,
        HALF=half,
        HEADS_PAD=triton.next_power_of_2(num_heads),
        HALF_PAD=triton.next_power_of_2(half),
        REST_PAD=triton.next_power_of_2(max(1, head_dim - 2 * half)),
    )
    return out
