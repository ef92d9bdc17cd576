"""The model's hot operations, each in two implementations; which set a model runs is chosen here.

    operation      reference set (PyTorch, any device)        fused set (Triton: CUDA, or the interpreter)
    rms_norm       kernels.reference.rms_norm_reference       kernels.rmsnorm.rms_norm (residual add fused in)
    rotary         kernels.reference.rotary_reference         kernels.rope.apply_rotary
    silu_and_mul   kernels.reference.silu_and_mul_reference   kernels.activation.silu_and_mul
    linear         F.linear                                   GEMV for decode-sized fp16/bf16 batches, else F.linear

The model's forward is written once against `ModelOps`; `model_ops(attention_backend)` is the one place
that picks the set: the Triton attention backend takes the fused kernels (a decode step launches ~11
kernels per layer instead of ~35), any other backend the reference. Both sets round where transformers'
Llama does, so they agree to the last bit wherever the kernels do (see tests/kernels/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.attention import AttentionBackend
from kernels.reference import rms_norm_reference, rotary_reference, silu_and_mul_reference

GEMV_MAX_ROWS = 4  # at most this many tokens, a projection is a weight stream: the Triton GEMV
GEMV_DTYPES = (torch.float16, torch.bfloat16)

NormResult = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ModelOps:
    name: str  # "reference" | "fused"
    # (x [T, hidden], weight [hidden], eps, residual [T, hidden] | None) -> normed [T, hidden], or with a
    # residual (norm(x + residual), x + residual), the sum rounded to x's dtype
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor | None], NormResult]
    # (x [T, heads, D], cos [T, D/2], sin [T, D/2]) -> [T, heads, D] contiguous, HF "rotate_half" pairs
    rotary: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    # (gate_up [T, 2I], [gate | up]) -> silu(gate) * up [T, I]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    # (x [T, K], a module with `weight` [N, K] and maybe `bias` [N]) -> [T, N]
    linear: Callable[[torch.Tensor, nn.Module], torch.Tensor]


def reference_linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # x: [T, K] -> [T, N]
    return F.linear(x, layer.weight, getattr(layer, "bias", None))


def linear(x: torch.Tensor, layer: nn.Module) -> torch.Tensor:  # x: [T, K] -> [T, N]
    """`layer`'s projection on the fused path: the GEMV kernel for decode-sized batches, where cuBLAS reads
    the weights well below copy bandwidth; F.linear else."""
    weight, bias = layer.weight, getattr(layer, "bias", None)
    is_decode_sized = x.dim() == 2 and 0 < x.shape[0] <= GEMV_MAX_ROWS
    is_half = x.dtype in GEMV_DTYPES and weight.dtype == x.dtype
    if is_decode_sized and is_half and x.stride(-1) == weight.stride(-1) == 1:
        from kernels.gemv import gemv  # imported lazily, here and below: Triton is only needed on this path

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


def _fused_rms_norm(x, weight, eps, residual=None):
    from kernels.rmsnorm import rms_norm

    return rms_norm(x, weight, eps, residual)


def _fused_rotary(x, cos, sin):
    from kernels.rope import apply_rotary

    return apply_rotary(x, cos, sin)


def _fused_silu_and_mul(gate_up):
    from kernels.activation import silu_and_mul

    return silu_and_mul(gate_up)


REFERENCE_OPS = ModelOps("reference", rms_norm_reference, rotary_reference, silu_and_mul_reference, reference_linear)
FUSED_OPS = ModelOps("fused", _fused_rms_norm, _fused_rotary, _fused_silu_and_mul, linear)


def model_ops(attention_backend: AttentionBackend) -> ModelOps:
    """The fused kernels come with the Triton attention backend; every other backend runs the reference."""
    return FUSED_OPS if attention_backend.name == "triton" else REFERENCE_OPS
