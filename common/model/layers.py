"""Building blocks of the Llama family: RMSNorm, rotary embeddings, the SwiGLU MLP.

Numerics follow transformers' Llama code (norm in float32, RoPE angles in float32 then cast to the
activation dtype) so logits match it to float32 rounding. Nothing here is device specific, except
`fused_rms_norm`, `linear` and `SwiGLUMLP.forward_fused`, which run the same math as Triton kernels
(used with the Triton backend).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.model.config import RopeScaling


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, hidden]
        x_float = x.float()
        x_float = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_float.to(x.dtype)


def fused_rms_norm(
    norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`norm` by the Triton kernel; with `residual`, (norm(x + residual), x + residual) in one pass."""
    from kernels.rmsnorm import rms_norm  # imported lazily: Triton is only needed on this path

    return rms_norm(x, norm.weight, norm.eps, residual)


GEMV_MAX_ROWS = 4  # at most this many tokens, a projection is a weight stream: the Triton GEMV
GEMV_DTYPES = (torch.float16, torch.bfloat16)


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # x: [T, K] -> [T, N]
    """`layer`'s projection (its `weight` [N, K], `bias` [N] if any) on the Triton path: the GEMV kernel
    for decode-sized batches, where cuBLAS reads the weights well below copy bandwidth; F.linear else."""
    weight, bias = layer.weight, getattr(layer, "bias", None)
    is_decode_sized = x.dim() == 2 and 0 < x.shape[0] <= GEMV_MAX_ROWS
    is_half = x.dtype in GEMV_DTYPES and weight.dtype == x.dtype
    if is_decode_sized and is_half and x.stride(-1) == weight.stride(-1) == 1:
        from kernels.gemv import gemv  # imported lazily: Triton is only needed on this path

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def rope_inverse_frequencies(
    head_dim: int, rope_theta: float, rope_scaling: RopeScaling | None
) -> torch.Tensor:  # [head_dim // 2] float32
    """Per-pair rotation speeds; llama3 scaling slows the low frequencies, keeps the high ones."""
    # Explicitly on CPU: the model may be built under a meta-device context.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)
    if rope_scaling is None:
        return inv_freq
    if rope_scaling.rope_type == "linear":
        return inv_freq / rope_scaling.factor
    scaling = rope_scaling
    low_freq_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_freq_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    # Between the two wavelengths, blend scaled and unscaled frequencies linearly.
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for the given positions once per forward; every layer reuses them."""

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: RopeScaling | None):
        super().__init__()
        # Not a buffer: the model is built on the meta device and materialised with to_empty(),
        # which would leave a buffer uninitialised. A per-device copy is cached instead.
        self._inv_freq_cpu = rope_inverse_frequencies(head_dim, rope_theta, rope_scaling)
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {}

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:  # positions: [T] -> cos, sin: [T, head_dim // 2]
        inv_freq = self._inv_freq_by_device.get(positions.device)
        if inv_freq is None:
            inv_freq = self._inv_freq_cpu.to(positions.device)
            self._inv_freq_by_device[positions.device] = inv_freq
        angles = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(
    x: torch.Tensor,  # [T, num_heads, head_dim]
    cos: torch.Tensor,  # [T, head_dim // 2]
    sin: torch.Tensor,  # [T, head_dim // 2]
) -> torch.Tensor:  # [T, num_heads, head_dim]
    """Rotates the pairs (x[i], x[i + D/2]) (the HF "rotate_half" layout, not interleaved)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, hidden]
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)  # [T, I] each
        return self.down_proj(F.silu(gate) * up)

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, hidden] -> [T, hidden]
        """Triton path: silu(gate) * up in one kernel straight from the fused projection; GEMV projections
        for decode-sized batches."""
        from kernels.activation import silu_and_mul  # imported lazily: Triton is only needed on this path

        activated = silu_and_mul(linear(x, self.gate_up_proj))  # [T, 2I] -> [T, I]
        return linear(activated, self.down_proj)
