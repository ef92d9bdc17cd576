"""RMSNorm, optionally fused with the residual add that precedes it in every Llama block.

One program normalises one token's row. Numerics follow transformers' Llama (and
`kernels.reference.rms_norm_reference`): the residual sum is rounded to the activation dtype, the
statistics are fp32, the normalised row is rounded to the activation dtype before the weight is
applied, and the product is rounded again; so half-precision results match the reference bit for
bit up to the order of the fp32 sum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_utils import FLOAT_DTYPES, check_tensor, launch


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [num_tokens, hidden]
    residual_ptr,  # [num_tokens, hidden] (HAS_RESIDUAL only)
    weight_ptr,  # [hidden]
    out_ptr,  # [num_tokens, hidden] normalised rows, x dtype
    residual_out_ptr,  # [num_tokens, hidden] x + residual, x dtype (HAS_RESIDUAL only)
    stride_x,
    stride_residual,
    stride_out,
    stride_residual_out,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,  # hidden rounded up to a power of two
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < hidden
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + offs, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * stride_residual_out + offs, x, mask=mask)
    x_float = x.to(tl.float32)
    mean_square = tl.sum(x_float * x_float, axis=0) / hidden
    normed = (x_float * tl.rsqrt(mean_square + eps)).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(x_ptr.dtype.element_ty)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden], x's dtype
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """norm(x) * weight, or (norm(x + residual) * weight, x + residual) when residual is given."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    num_tokens, hidden = x.shape
    check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES, device=x.device)
    if weight.shape[0] != hidden:
        raise ValueError(f"weight has {weight.shape[0]} elements, x rows have {hidden}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if residual is not None:
        check_tensor("residual", residual, ndim=2, dtypes=(x.dtype,), device=x.device)
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else out
    if num_tokens > 0:
        block = triton.next_power_of_2(hidden)
        launch(
            _rms_norm_kernel, (num_tokens,), x.device,
            x, residual if residual is not None else x, weight, out, residual_out,
            x.stride(0), residual.stride(0) if residual is not None else 0, out.stride(0), residual_out.stride(0),
            hidden, eps,
            HAS_RESIDUAL=residual is not None,
            BLOCK=block,
            num_warps=min(16, max(1, block // 256)),
        )
    return out if residual is None else (out, residual_out)
