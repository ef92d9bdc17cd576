"""bench/attention_kernels.py runs end to end (tiny sizes: CPU through the interpreter, CUDA
compiled) and reports checked results."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.devices import DEVICES

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("device", DEVICES)
def test_bench_kernels_run_writes_checked_results(tmp_path, device):
    output = tmp_path / "bench.json"
    command = [
        sys.executable, str(REPO / "bench" / "attention_kernels.py"), "--device", device,
        "--batches", "1,3", "--contexts", "100", "--prompt-len", "20", "--repeats", "1", "--copy-mib", "1", "--output", str(output),
    ]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script must set it itself
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    results = json.loads(output.read_text())
    assert [(row["batch"], row["context_len"]) for row in results["decode"]] == [(1, 100), (3, 100)]
    for row in results["decode"]:
        assert row["rel_error"] < 1e-2 and row["gbps"] > 0 and 0 < row["fraction_of_copy"]
        assert row["other_num_splits"] == 2 and row["other_gbps"] > 0  # the split path ran too
    assert results["prefill"]["prompt_len"] == 20 and results["prefill"]["tflops"] > 0
    assert results["copy"]["gbps"] > 0
    assert "prefill, 20-token causal prompt" in result.stdout.splitlines()[-1]  # the table is printed last
