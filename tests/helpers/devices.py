"""Device parameters for tests that check one claim on the CPU and, where there is one, on CUDA.

    @pytest.mark.parametrize("device", DEVICES)          # ids "cpu" and "cuda"
    def test_x(device): ...

    @pytest.mark.parametrize("device, dtype", device_dtypes([torch.float32], [torch.float32, torch.bfloat16]))

A CUDA case carries the `gpu` mark (so `pytest -m gpu` runs exactly the CUDA cases) and is skipped
only when torch sees no CUDA device. The CPU case is the same test body: no GPU check exists
without a CPU sibling.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (torch.cuda.is_available() is False)")
GPU_MARKS = (pytest.mark.gpu, requires_cuda)

DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def on_cuda(*values: object, id: str | None = None):  # noqa: A002 (pytest.param's own keyword)
    """pytest.param(*values) for a CUDA case: marked gpu, skipped where CUDA is unavailable."""
    return pytest.param(*values, marks=GPU_MARKS, id=id)


CPU = pytest.param("cpu", id="cpu")
CUDA = on_cuda("cuda", id="cuda")
DEVICES = [CPU, CUDA]


def device_dtypes(cpu_dtypes: Sequence[torch.dtype], cuda_dtypes: Sequence[torch.dtype]) -> list:
    """("device", dtype) params: each CPU dtype, then each CUDA dtype (ids like "cuda-bf16")."""
    params = [pytest.param("cpu", dtype, id=f"cpu-{DTYPE_IDS[dtype]}") for dtype in cpu_dtypes]
    return params + [on_cuda("cuda", dtype, id=f"cuda-{DTYPE_IDS[dtype]}") for dtype in cuda_dtypes]


def case_device(request: pytest.FixtureRequest) -> str:
    """The `device` parameter of the running test ("cpu" when the test is not parametrized by it)."""
    callspec = getattr(request.node, "callspec", None)
    return callspec.params.get("device", "cpu") if callspec is not None else "cpu"


@contextmanager
def exact_float32_matmuls() -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN, so float32 on CUDA is compared at float32 precision."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
