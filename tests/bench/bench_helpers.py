"""Runs a bench script as a user would (a subprocess from another folder) and reads its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, args: list[str], tmp_path: Path, timeout: float = 120) -> tuple[dict, list[str]]:
    """(JSON result, stdout lines) of `python bench/<script> ... --output <tmp>`; fails on a non-zero exit."""
    output = tmp_path / f"{Path(script).stem}.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, str(REPO / "bench" / script), *args, "--output", str(output)]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(output.read_text()), result.stdout.strip().splitlines()
