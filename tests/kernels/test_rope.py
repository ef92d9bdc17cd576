"""Triton rotary embedding vs the reference and the model's rotary op, on the CPU (interpreter)
and on CUDA (compiled kernel, reference computed on CUDA too)."""

import pytest
import torch

import common.attention  # noqa: F401  (kernels.reference cannot be the first import of the package)
from kernels.reference import rotary_reference
from kernels.rope import apply_rotary
from tests.helpers.devices import DEVICES


def _angles(num_tokens, half, dtype, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4096, (num_tokens,), generator=generator)
    inv_freq = 1.0 / (10000 ** (torch.arange(half).float() / half))
    angles = positions.float()[:, None] * inv_freq[None, :]
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_heads, head_dim, rotary_dim", [(3, 64, 64), (8, 128, 128), (2, 80, 32)])
def test_rotary_matches_reference(dtype, num_heads, head_dim, rotary_dim, device):
    cos, sin = _angles(7, rotary_dim // 2, dtype, device=device)
    x = torch.randn(7, num_heads, head_dim).to(device=device, dtype=dtype)
    out = apply_rotary(x, cos, sin)
    expected = rotary_reference(x, cos, sin)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close_in_dtype(out, expected)


def assert_close_in_dtype(out, expected):
    """Exact in fp32/fp16. The interpreter truncates fp32 -> bf16 (GPUs round to nearest even), so
    bf16 products may differ by an ulp, which x1 * cos - x2 * sin can turn into an absolute 2^-5.
    Compiled for CUDA, fp32 x1 * cos - x2 * sin may become one fused multiply-add (no rounding of
    x2 * sin): at most half an ulp of a product (|x|, |cos| < 5) apart. For fp16 on CUDA the kernel
    computes in fp32 and rounds once while the reference rounds every fp16 product: one ulp apart."""
    if out.dtype == torch.bfloat16:
        torch.testing.assert_close(out.float(), expected.float(), atol=2**-5, rtol=2**-6)
    elif out.dtype == torch.float32 and out.is_cuda:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
    elif out.dtype == torch.float16 and out.is_cuda:
        torch.testing.assert_close(out, expected, atol=2**-11, rtol=2**-10)
    else:
        assert torch.equal(out, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_matches_the_model_on_a_fused_qkv_view(device):
    from common.model.ops import REFERENCE_OPS

    cos, sin = _angles(5, 32, torch.bfloat16, seed=2, device=device)
    qkv = torch.randn(5, 4 + 2 * 2, 64).to(device=device, dtype=torch.bfloat16)  # [T, H + 2 Hkv, D]
    key = qkv[:, 4:6]
    assert_close_in_dtype(apply_rotary(key, cos, sin), REFERENCE_OPS.rotary(key, cos, sin))


def test_rotary_rejects_bad_tables():
    x = torch.randn(4, 2, 64)
    cos, sin = _angles(4, 32, torch.float32)
    with pytest.raises(ValueError, match="cos must be"):
        apply_rotary(x, cos[:3], sin[:3])
    with pytest.raises(ValueError, match="cos must be"):
        apply_rotary(x, torch.cat([cos, cos], 1), torch.cat([sin, sin], 1)[:, :64])
    with pytest.raises(ValueError, match="sin must have dtype"):
        apply_rotary(x, cos, sin.half())
    with pytest.raises(ValueError, match="sin shape"):
        apply_rotary(x, cos, sin[:, :16])
