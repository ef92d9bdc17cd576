"""Kernel tests run the Triton kernels on CPU through the Triton interpreter.

TRITON_INTERPRET is set per test (not at import) so it never leaks into other test folders; the
launchers read it at launch time (kernels.launch_utils.runnable_kernel), so it does not matter
whether the kernel modules were imported earlier in the same pytest process.
"""

import pytest


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
