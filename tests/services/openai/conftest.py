"""One real Tandem system for the OpenAI API tests: `tandem serve` (a prefill worker, a decode worker and
the frontend with its HTTP API) on free ports, the embedded SmolLM2, CPU."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[3]
_READY_TIMEOUT_SECONDS = 300.0


@dataclass
class TandemSystem:
    http_url: str  # e.g. http://localhost:8000/v1
    grpc_address: str  # frontend host:port
    prefill_addresses: list[str]
    decode_addresses: list[str]
    log_dir: Path


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def tandem_system(tmp_path_factory) -> TandemSystem:
    work_dir = tmp_path_factory.mktemp("tandem-serve")
    ready_file = work_dir / "ready.json"
    argv = [
        sys.executable, "-m", "services.cli", "serve", "--port", "0", "--http-port", "0",
        "--host", "127.0.0.1", "--log-dir", str(work_dir / "logs"), "--ready-file", str(ready_file),
        "--max-model-len", "1024", "--num-kv-blocks", "256", "--block-size", "16",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    with open(work_dir / "serve.out", "w") as out:
        process = subprocess.Popen(argv, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
        while not ready_file.exists():
            if process.poll() is not None:
                pytest.fail(f"tandem serve exited with {process.returncode}:\n{(work_dir / 'serve.out').read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"tandem serve not ready after {_READY_TIMEOUT_SECONDS:.0f}s (logs in {work_dir})")
            time.sleep(0.5)
        ready = json.loads(ready_file.read_text())
        yield TandemSystem(ready["http"], ready["frontend"], ready["prefill"], ready["decode"], work_dir / "logs")
    finally:
        _stop(process)
