"""Triton RMSNorm (plain and fused with the residual add) vs the reference and the model's RMSNorm,
on the CPU (interpreter) and on CUDA (compiled kernel, reference computed on CUDA too)."""

import pytest
import torch

import common.attention  # noqa: F401  (kernels.reference cannot be the first import of the package)
from kernels.reference import rms_norm_reference
from kernels.rmsnorm import rms_norm
from tests.helpers.devices import DEVICES


def _inputs(num_tokens, hidden, dtype, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    x = (torch.randn(num_tokens, hidden, generator=generator) * 3).to(dtype)
    residual = torch.randn(num_tokens, hidden, generator=generator).to(dtype)
    weight = (1 + 0.5 * torch.randn(hidden, generator=generator)).to(dtype)
    return x.to(device), residual.to(device), weight.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 576, 1000])
@pytest.mark.parametrize("has_residual", [False, True])
def test_rms_norm_matches_reference(dtype, hidden, has_residual, device):
    x, residual, weight = _inputs(5, hidden, dtype, device=device)
    if has_residual:
        out, residual_sum = rms_norm(x, weight, 1e-5, residual=residual)
        expected, expected_sum = rms_norm_reference(x, weight, 1e-5, residual=residual)
        assert_close_in_dtype(residual_sum, expected_sum)
    else:
        out, expected = rms_norm(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5)
    assert out.dtype == dtype and not torch.isnan(out).any()
    assert_close_in_dtype(out, expected)


def assert_close_in_dtype(out, expected):
    """The kernel rounds like the reference, but the interpreter truncates fp32 -> bf16 (GPUs round
    to nearest even), so bf16 may differ by a few ulps (sum, norm, product); fp32/fp16 only by the
    fp32 sum order. On CUDA the fp32 statistics also differ by the hardware rsqrt, which can move
    the fp32 normalised value across an fp16 rounding boundary: one ulp before the weight and one
    after it."""
    if out.dtype == torch.bfloat16:
        torch.testing.assert_close(out.float(), expected.float(), atol=1e-3, rtol=2**-5)
    elif out.dtype == torch.float16 and out.is_cuda:
        torch.testing.assert_close(out.float(), expected.float(), atol=1e-4, rtol=2**-8)
    else:
        torch.testing.assert_close(out.float(), expected.float(), atol=1e-5, rtol=2**-10)


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_matches_the_model_layer_on_strided_rows(device):
    from common.model.layers import RMSNorm

    x, _, weight = _inputs(6, 128, torch.bfloat16, seed=1, device=device)
    wide = torch.randn(6, 256).to(device=device, dtype=torch.bfloat16)
    wide[:, :128] = x  # a row stride of 256
    layer = RMSNorm(128, eps=1e-6).to(device=device, dtype=torch.bfloat16)
    layer.weight.data.copy_(weight)
    assert_close_in_dtype(rms_norm(wide[:, :128], weight, 1e-6), layer(x))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weight": torch.ones(63)}, "weight has 63"),
        ({"eps": 0.0}, "eps"),
        ({"residual": torch.ones(4, 64, dtype=torch.float16)}, "residual must have dtype"),
        ({"residual": torch.ones(3, 64)}, "residual shape"),
        ({"x": torch.ones(4, 2, 32)}, "x must have 2 dimensions"),
    ],
)
def test_rms_norm_rejects_bad_inputs(kwargs, message):
    arguments = {"x": torch.ones(4, 64), "weight": torch.ones(64), "eps": 1e-6, **kwargs}
    with pytest.raises(ValueError, match=message):
        rms_norm(**arguments)
