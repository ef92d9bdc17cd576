"""The Triton backend's tests run its kernels as the kernel tests do: interpreted on the CPU, compiled on CUDA."""

from tests.kernels.conftest import triton_interpreter  # noqa: F401  (autouse fixture)
