"""GPU workers make UCX's progress thread poll (cuda_ipc completions raise no event); others keep the
sleeping default. Each case starts UCX in a fresh process: the mode is fixed when UCX starts."""

import os
import subprocess
import sys

import pytest

PROBE = """
import sys
from common.transfer.ucx_runtime import UcxRuntime, prefer_busy_progress
if sys.argv[1] == "busy":
    prefer_busy_progress()
runtime = UcxRuntime.get()
print(runtime.ucxx.core._get_ctx().progress_mode)
"""


@pytest.mark.parametrize("choice, expected", [("busy", "thread-polling"), ("default", "thread")])
def test_progress_mode_is_chosen_before_ucx_starts(choice, expected):
    env = {k: v for k, v in os.environ.items() if k != "UCXPY_PROGRESS_MODE"}
    result = subprocess.run([sys.executable, "-c", PROBE, choice], capture_output=True, text=True, timeout=120,
                            env=env, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(__file__)))))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == expected
