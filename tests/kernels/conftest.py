"""Kernel tests: CPU cases run the Triton kernels in the interpreter, CUDA cases run them compiled.

TRITON_INTERPRET is set per test (not at import) so it never leaks into other test folders; the
launchers read it at launch time (kernels.launch_utils.runnable_kernel), so it does not matter
whether the kernel modules were imported earlier in the same pytest process. A test's device is
its `device` parameter (tests/helpers/devices.py); tests without one are CPU tests.
"""

import importlib

import pytest

from tests.helpers.devices import case_device, exact_float32_matmuls

KERNEL_MODULES = (
    "activation", "gemv", "kv_cache_write", "paged_decode_attention", "paged_tiles", "prefill_attention", "rmsnorm",
    "rope",
)


def assert_kernels_compile() -> None:
    """A process started with TRITON_INTERPRET=1 decorates every kernel as interpreted-only, and
    CUDA cases would then silently test the interpreter: refuse that."""
    from triton.runtime.jit import JITFunction

    from kernels.launch_utils import is_interpreter_enabled

    assert not is_interpreter_enabled(), "CUDA cases must run the compiled kernels, not the interpreter"
    for module_name in KERNEL_MODULES:
        module = importlib.import_module(f"kernels.{module_name}")
        for name, value in vars(module).items():
            if name.startswith("_") and name.endswith("_kernel"):  # the @triton.jit kernels
                assert isinstance(value, JITFunction), (
                    f"kernels.{module_name}.{name} is {type(value).__name__}, not a compiled JITFunction: "
                    "start pytest without TRITON_INTERPRET for CUDA runs"
                )


@pytest.fixture(autouse=True)
def triton_interpreter(request, monkeypatch):
    if case_device(request) == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        assert_kernels_compile()
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with exact_float32_matmuls():  # references computed on CUDA stay at float32 precision
        yield
