"""Triton silu(gate) * up vs the reference and the model's SwiGLU MLP, on the CPU (interpreter) and on
CUDA (compiled kernel, reference computed on CUDA too), writing into NaN-poisoned outputs."""

import pytest
import torch

import common.attention  # noqa: F401  (kernels.reference cannot be the first import of the package)
from kernels.activation import silu_and_mul
from kernels.reference import silu_and_mul_reference
from tests.helpers.devices import DEVICES

# Gates far below zero overflow exp(-gate) to inf on purpose (silu -> -0); numpy, under the
# interpreter, warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _gate_up(num_tokens, intermediate, dtype, seed=0, device="cpu"):
    """[T, 2 I] with gates spread wide enough to reach SiLU's flat negative tail and its linear side."""
    generator = torch.Generator().manual_seed(seed)
    gate_up = torch.randn(num_tokens, 2 * intermediate, generator=generator) * 3
    gate_up[:, :intermediate:7] *= 10  # some gates far out on both sides
    return gate_up.to(dtype).to(device)


def assert_close_in_dtype(out, expected):
    """SiLU and the product round like the reference; what differs is the fp32 exponential (the GPU's
    is approximate) and, in the interpreter, fp32 -> bf16 truncating where GPUs round to nearest
    even: the rounded SiLU can move by an ulp of the dtype, and the product by one more."""
    if out.dtype == torch.bfloat16:
        torch.testing.assert_close(out.float(), expected.float(), atol=1e-3, rtol=2**-5)
    elif out.dtype == torch.float16:
        torch.testing.assert_close(out.float(), expected.float(), atol=1e-4, rtol=2**-8)
    else:
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("intermediate", [64, 96, 1376, 11008])  # 1376, 11008: 5.4 and 43 blocks of 256
@pytest.mark.parametrize("num_tokens", [1, 3, 17])
def test_silu_and_mul_matches_reference(num_tokens, intermediate, dtype, device):
    gate_up = _gate_up(num_tokens, intermediate, dtype, seed=num_tokens + intermediate, device=device)
    out = torch.full((num_tokens, intermediate), float("nan"), dtype=dtype, device=device)
    result = silu_and_mul(gate_up, out=out)
    assert result is out and out.dtype == dtype
    assert not torch.isnan(out).any(), "columns left unwritten"
    assert_close_in_dtype(out, silu_and_mul_reference(gate_up))


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul_on_strided_rows_matches_the_model_mlp(device):
    """A row stride on both sides (a view into a wider projection, a view into a wider output), and the
    same numbers as SwiGLUMLP's eager forward."""
    from common.model.layers import SwiGLUMLP

    dtype, num_tokens, hidden, intermediate = torch.bfloat16, 5, 64, 96
    torch.manual_seed(2)  # the MLP's own initial weights
    mlp = SwiGLUMLP(hidden, intermediate).to(device=device, dtype=dtype)
    x = torch.randn(num_tokens, hidden, generator=torch.Generator().manual_seed(2)).to(device=device, dtype=dtype)
    wide = torch.randn(num_tokens, 2 * intermediate + 40).to(device=device, dtype=dtype)
    wide[:, 8 : 8 + 2 * intermediate] = mlp.gate_up_proj(x)
    wide_out = torch.full((num_tokens, intermediate + 24), float("nan"), dtype=dtype, device=device)
    silu_and_mul(wide[:, 8 : 8 + 2 * intermediate], out=wide_out[:, :intermediate])
    assert torch.isnan(wide_out[:, intermediate:]).all(), "wrote past the output's columns"
    gate, up = mlp.gate_up_proj(x).split(intermediate, dim=-1)
    assert_close_in_dtype(wide_out[:, :intermediate], torch.nn.functional.silu(gate) * up)
    # After down_proj a one-ulp change of an input can land on an output near zero: compare as a whole.
    fused, eager = mlp.down_proj(wide_out[:, :intermediate]).float(), mlp(x).float()
    assert ((fused - eager).norm() / eager.norm()).item() < 1e-2


def test_silu_and_mul_of_no_tokens_is_empty():
    assert silu_and_mul(torch.ones(0, 128)).shape == (0, 64)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"gate_up": torch.ones(4, 63)}, "even number of columns"),
        ({"gate_up": torch.ones(4, 2, 64)}, "gate_up must have 2 dimensions"),
        ({"gate_up": torch.ones(4, 64, dtype=torch.int32)}, "gate_up must have dtype"),
        ({"gate_up": torch.ones(64, 4).t()}, "gate_up must be contiguous in its last dimension"),
        ({"out": torch.ones(4, 64)}, "out must have shape"),
        ({"out": torch.ones(4, 32, dtype=torch.float16)}, "out must have dtype"),
    ],
)
def test_silu_and_mul_rejects_bad_inputs(kwargs, message):
    arguments = {"gate_up": torch.ones(4, 64), **kwargs}
    with pytest.raises(ValueError, match=message):
        silu_and_mul(**arguments)
