"""Building blocks of Llama-style decoders: RMSNorm, rotary embeddings, the SwiGLU MLP.

Numerics follow transformers' Llama code (norm in float32, RoPE angles in float32 then cast to the
activation dtype) so logits match it to float32 rounding. Modules compute through the `ModelOps` they
are built with (`common/model/ops.py`: PyTorch reference or Triton kernels), so each has one forward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from common.model.config import RopeScaling
from common.model.ops import REFERENCE_OPS, ModelOps, NormResult


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops: ModelOps = REFERENCE_OPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> NormResult:  # x: [T, hidden]
        """norm(x); with `residual` [T, hidden], (norm(x + residual), x + residual) in one pass."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


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


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with gate and up fused into one matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, ops: ModelOps = REFERENCE_OPS):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, hidden] -> [T, hidden]
        activated = self.ops.silu_and_mul(self.ops.linear(x, self.gate_up_proj))  # [T, 2I] -> [T, I]
        return self.ops.linear(activated, self.down_proj)
