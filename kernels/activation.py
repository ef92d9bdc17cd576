"""SwiGLU's activation, silu(gate) * up, read straight from the fused gate/up projection.

    gate_up = [gate | up],  gate, up: [num_tokens, intermediate] each (as `SwiGLUMLP.gate_up_proj` emits)
    out     = silu(gate) * up

In eager PyTorch this is a slice, a SiLU kernel and a multiply kernel with an intermediate [T, I]
tensor in between; here it is one pass over gate_up. Each program covers BLOCK columns of one token.
Rounding follows the eager expression `F.silu(gate) * up`: SiLU in fp32, rounded to the activation
dtype, then the product in fp32, rounded again, so results match
`kernels.reference.silu_and_mul_reference` up to the last bit of the exponential.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.launch_utils import FLOAT_DTYPES, check_out, check_tensor, launch, num_multiprocessors

MAX_BLOCK = 1024  # columns per program once there are enough programs to fill the GPU
MIN_BLOCK = 256  # smallest block: 8 elements per thread of one warp


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,  # [num_tokens, 2 * intermediate]: gate columns first, then up
    out_ptr,  # [num_tokens, intermediate], gate_up's dtype
    stride_gate_up,  # elements between rows of gate_up (>= 2 * intermediate)
    stride_out,  # elements between rows of out (>= intermediate)
    intermediate,  # columns of gate, of up and of out
    BLOCK: tl.constexpr,  # columns per program, a power of two
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < intermediate
    dtype = out_ptr.dtype.element_ty
    gate_row = gate_up_ptr + row * stride_gate_up
    gate = tl.load(gate_row + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_row + intermediate + offs, mask=mask, other=0.0).to(tl.float32)
    # Rounded to the activation dtype before the product, as F.silu(gate) * up is.
    activated = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (activated * up).to(dtype), mask=mask)


def _block_size(num_tokens: int, intermediate: int, device: torch.device) -> int:
    """Halves the block from MAX_BLOCK while the grid has fewer programs than the GPU has SMs, so a
    decode step of one token still spreads its row over many SMs."""
    block = min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(intermediate)))
    while block > MIN_BLOCK and num_tokens * triton.cdiv(intermediate, block) < num_multiprocessors(device):
        block //= 2
    return block


def token_counts_per_block(intermediate: int, device: torch.device) -> list[int]:
    """Ascending token counts, the smallest giving each BLOCK `silu_and_mul` picks for this width:
    a launch at each covers every variant the kernel has for it (the engine's warm-up runs them)."""
    num_sms = num_multiprocessors(device)
    largest = min(MAX_BLOCK, max(MIN_BLOCK, triton.next_power_of_2(intermediate)))
    blocks = [MIN_BLOCK << shift for shift in range(largest.bit_length() - MIN_BLOCK.bit_length() + 1)]
    # The block stops halving at b once num_tokens * cdiv(intermediate, b) reaches num_sms.
    candidates = {1} | {triton.cdiv(num_sms, triton.cdiv(intermediate, block)) for block in blocks}
    first_count: dict[int, int] = {}
    for num_tokens in sorted(candidates):
        first_count.setdefault(_block_size(num_tokens, intermediate, device), num_tokens)
    return sorted(first_count.values())


def silu_and_mul(
    gate_up: torch.Tensor,  # [num_tokens, 2 * intermediate]; may have a row stride
    out: torch.Tensor | None = None,  # [num_tokens, intermediate], gate_up's dtype
) -> torch.Tensor:  # [num_tokens, intermediate]
    """silu(gate_up[:, :I]) * gate_up[:, I:], written into `out` when given (else a new tensor)."""
    check_tensor("gate_up", gate_up, ndim=2, dtypes=FLOAT_DTYPES)
    num_tokens, width = gate_up.shape
    if width % 2:
        raise ValueError(f"gate_up must have an even number of columns ([gate | up]), got {width}")
    intermediate = width // 2
    out = check_out(out, gate_up[:, :intermediate])
    if num_tokens == 0 or intermediate == 0:
        return out
    block = _block_size(num_tokens, intermediate, gate_up.device)
    launch(
        _silu_and_mul_kernel, (num_tokens, triton.cdiv(intermediate, block)), gate_up.device,
        gate_up, out, gate_up.stride(0), out.stride(0), intermediate,
        BLOCK=block,
        num_warps=block // MIN_BLOCK,
    )
    return out
