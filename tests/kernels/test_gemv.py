"""Triton GEMV vs an exact (float64) reference, on the CPU (interpreter) and on CUDA (compiled kernel,
reference computed on CUDA too), over awkward sizes and the Llama-3-8B projections, writing into
NaN-poisoned outputs."""

import pytest
import torch

import common.attention  # noqa: F401  (kernels.reference cannot be the first import of the package)
from kernels.gemv import MAX_ROWS, gemv
from kernels.reference import gemv_reference
from tests.helpers.devices import DEVICES, device_dtypes, on_cuda

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _operands(num_rows, num_features, num_inputs, dtype, device, *, has_bias, seed=0):
    """x: [M, K], weight: [N, K] scaled so outputs are O(1), bias: [N] or None; fresh random values."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, num_inputs, generator=generator)
    weight = torch.randn(num_features, num_inputs, generator=generator) * num_inputs**-0.5
    bias = torch.randn(num_features, generator=generator) if has_bias else None
    cast = lambda tensor: None if tensor is None else tensor.to(device=device, dtype=dtype)  # noqa: E731
    return cast(x), cast(weight), cast(bias)


def assert_close_in_dtype(out, expected):
    """The kernel sums in fp32 in its own order and rounds once; the reference is exact and rounds
    once. They differ by an ulp of the dtype at most (the interpreter truncates fp32 -> bf16 where
    GPUs round to nearest), plus fp32 summation error on outputs near zero."""
    tolerances = {torch.bfloat16: (2e-3, 2**-7), torch.float16: (2e-4, 2**-10), torch.float32: (1e-5, 1e-5)}
    atol, rtol = tolerances[out.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=atol, rtol=rtol)


def _run_poisoned(num_rows, num_features, num_inputs, dtype, device, has_bias, seed=0):
    x, weight, bias = _operands(num_rows, num_features, num_inputs, dtype, device, has_bias=has_bias, seed=seed)
    out = torch.full((num_rows, num_features), float("nan"), dtype=dtype, device=device)
    result = gemv(x, weight, bias, out=out)
    assert result is out and out.dtype == dtype
    assert not torch.isnan(out).any(), "outputs left unwritten"
    assert_close_in_dtype(out, gemv_reference(x, weight, bias))


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("num_rows", [1, 2, 3])
@pytest.mark.parametrize(
    "num_features, num_inputs",
    [(1000, 520), (96, 4096), (768, 512), (3, 70)],  # ragged K; K=4096; a qkv-like tile multiple; N < BLOCK_N
)
def test_gemv_matches_reference_on_cpu(num_features, num_inputs, num_rows, dtype):
    has_bias = num_rows != 2  # every shape and dtype runs with and without bias
    _run_poisoned(num_rows, num_features, num_inputs, dtype, "cpu", has_bias, seed=num_features + num_rows)


@pytest.mark.parametrize("device", DEVICES)
def test_gemv_of_four_rows(device):
    _run_poisoned(MAX_ROWS, 136, 384, torch.bfloat16, device, has_bias=True, seed=4)


LLAMA3_8B_PROJECTIONS = {  # (N, K)
    "qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
    "lm_head": (128256, 4096), "kv_only": (1024, 4096), "odd": (1000, 520),
}


@pytest.mark.parametrize(
    "device, dtype, shape",
    [
        on_cuda("cuda", dtype, shape, id=f"cuda-{dtype_id}-{name}")
        for dtype, dtype_id in [(torch.bfloat16, "bf16"), (torch.float16, "fp16")]
        for name, shape in LLAMA3_8B_PROJECTIONS.items()
    ] + [on_cuda("cuda", torch.float32, (1000, 520), id="cuda-fp32-odd")],
)
@pytest.mark.parametrize("num_rows", [1, 2, 3, 4])
def test_gemv_matches_reference_on_llama_shapes(device, dtype, shape, num_rows):
    num_features, num_inputs = shape
    _run_poisoned(num_rows, num_features, num_inputs, dtype, device, has_bias=num_rows % 2 == 0, seed=num_rows)


@pytest.mark.parametrize("device, dtype", device_dtypes([torch.bfloat16], [torch.bfloat16, torch.float16]))
def test_gemv_reads_strided_rows_and_writes_only_its_columns(device, dtype):
    """x a column slice of a wider activation, out a column slice of a wider buffer."""
    num_rows, num_features, num_inputs = 3, 200, 256
    x, weight, bias = _operands(num_rows, num_features, num_inputs, dtype, device, has_bias=True, seed=7)
    wide_x = torch.randn(num_rows, num_inputs + 64).to(device=device, dtype=dtype)
    wide_x[:, 16 : 16 + num_inputs] = x
    wide_out = torch.full((num_rows, num_features + 40), float("nan"), dtype=dtype, device=device)
    gemv(wide_x[:, 16 : 16 + num_inputs], weight, bias, out=wide_out[:, 8 : 8 + num_features])
    assert torch.isnan(wide_out[:, :8]).all() and torch.isnan(wide_out[:, 8 + num_features :]).all()
    assert_close_in_dtype(wide_out[:, 8 : 8 + num_features], gemv_reference(x, weight, bias))


@pytest.mark.parametrize("device", DEVICES)
def test_gemv_matches_f_linear_of_a_linear_layer(device):
    """Same numbers as nn.Linear's own forward (what the model's reference path runs)."""
    torch.manual_seed(3)
    layer = torch.nn.Linear(320, 130, bias=True).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(2, 320, generator=torch.Generator().manual_seed(3)).to(device=device, dtype=torch.bfloat16)
    assert_close_in_dtype(gemv(x, layer.weight, layer.bias), layer(x).detach())


def test_gemv_of_no_rows_or_no_inputs():
    assert gemv(torch.ones(0, 64), torch.ones(32, 64)).shape == (0, 32)
    bias = torch.randn(5)
    torch.testing.assert_close(gemv(torch.ones(2, 0), torch.ones(5, 0), bias), bias.expand(2, 5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"x": torch.ones(5, 64)}, "x must have at most 4 rows"),
        ({"x": torch.ones(64)}, "x must have 2 dimensions"),
        ({"x": torch.ones(2, 64, dtype=torch.int32)}, "x must have dtype"),
        ({"x": torch.ones(64, 2).t()}, "x must be contiguous in its last dimension"),
        ({"weight": torch.ones(32, 48)}, "weight must have 64 columns"),
        ({"weight": torch.ones(32, 64, dtype=torch.float16)}, "weight must have dtype"),
        ({"weight": torch.ones(64, 32).t()}, "weight must be contiguous in its last dimension"),
        ({"bias": torch.ones(31)}, "bias must have 32 elements"),
        ({"bias": torch.ones(32, dtype=torch.float16)}, "bias must have dtype"),
        ({"out": torch.ones(2, 31)}, "out must have shape"),
        ({"out": torch.ones(2, 32, dtype=torch.float16)}, "out must have dtype"),
    ],
)
def test_gemv_rejects_bad_inputs(kwargs, message):
    arguments = {"x": torch.ones(2, 64), "weight": torch.ones(32, 64), **kwargs}
    with pytest.raises(ValueError, match=message):
        gemv(**arguments)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "num_rows, dtype, uses_gemv",
    [(1, torch.bfloat16, True), (4, torch.float16, True), (5, torch.bfloat16, False), (2, torch.float32, False)],
)
def test_model_linear_takes_the_gemv_for_decode_sized_half_batches(device, num_rows, dtype, uses_gemv, monkeypatch):
    """The Triton path's projections: gemv for 1..4 rows in fp16/bf16 (same numbers as nn.Linear),
    F.linear otherwise."""
    import kernels.gemv
    from common.model.ops import linear

    calls = []
    monkeypatch.setattr(kernels.gemv, "gemv", lambda *args: calls.append(args) or gemv(*args))
    torch.manual_seed(num_rows)
    layer = torch.nn.Linear(192, 72, bias=True).to(device=device, dtype=dtype)
    x = torch.randn(num_rows, 192, generator=torch.Generator().manual_seed(5)).to(device=device, dtype=dtype)
    with torch.no_grad():
        result, expected = linear(x, layer), layer(x)
    assert len(calls) == int(uses_gemv)
    if uses_gemv:
        assert_close_in_dtype(result, expected)
    else:
        torch.testing.assert_close(result, expected, atol=0, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_mlp_with_gemv_projections_matches_the_eager_mlp(device):
    from common.model.layers import SwiGLUMLP
    from common.model.ops import FUSED_OPS, REFERENCE_OPS

    dtype, hidden, intermediate = torch.bfloat16, 128, 344
    torch.manual_seed(6)
    mlp = SwiGLUMLP(hidden, intermediate, REFERENCE_OPS).to(device=device, dtype=dtype)
    fused_mlp = SwiGLUMLP(hidden, intermediate, FUSED_OPS).to(device=device, dtype=dtype)
    fused_mlp.load_state_dict(mlp.state_dict())
    x = torch.randn(3, hidden, generator=torch.Generator().manual_seed(6)).to(device=device, dtype=dtype)
    with torch.no_grad():
        fused, eager = fused_mlp(x).float(), mlp(x).float()
    # gate_up, SiLU x up and down each round to bf16 in both; one ulp of an input can move an output near
    # zero, so compare as a whole. The interpreter truncates those roundings (a bias toward zero, about
    # twice the error of rounding to nearest), hence the wider CPU bound.
    bound = 2e-2 if device == "cpu" else 1e-2
    assert ((fused - eager).norm() / eager.norm()).item() < bound
