"""Real Tandem processes for end-to-end tests: `tandem serve` and single services, on free ports.

Every process is started in a session of its own and killed by id in `stop()` (SIGTERM, then
SIGKILL after a grace period), so no service outlives the tests.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from common.healthcheck import check_health
from protos import worker_pb2, worker_pb2_grpc

REPO_ROOT = Path(__file__).resolve().parents[2]
TANDEM = [sys.executable, "-m", "services.cli"]
# Small pools and context keep six model copies within memory; 1 torch thread per service.
ENGINE_ARGS = ["--kv-cache-memory", "96MiB", "--max-model-len", "1024"]
START_TIMEOUT_SECONDS = 420.0


def service_env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    log_path: Path
    ready_file: Path

    def log_tail(self, num_lines: int = 30) -> str:
        lines = self.log_path.read_text(errors="replace").splitlines() if self.log_path.exists() else []
        return "\n".join(lines[-num_lines:])

    def ready_info(self, timeout_seconds: float = START_TIMEOUT_SECONDS) -> dict:
        """Waits for the ready file (the service is up); fails with the log if the process died."""
        deadline = time.monotonic() + timeout_seconds
        while not self.ready_file.exists():
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout_seconds}s:\n{self.log_tail()}")
            time.sleep(0.25)
        return json.loads(self.ready_file.read_text())


@dataclass
class Processes:
    """Starts processes and stops every one of them (and, for `tandem serve`, its children)."""

    log_dir: Path
    started: list[Process] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Process:
        """`env`: the process's whole environment (default `service_env()`)."""
        log_path = self.log_dir / f"{name}.log"
        ready_file = self.log_dir / f"{name}.ready.json"
        with open(log_path, "w") as log:
            popen = subprocess.Popen([*TANDEM, *argv, "--ready-file", str(ready_file)], stdout=log,
                                     stderr=subprocess.STDOUT, env=env or service_env(), cwd=REPO_ROOT,
                                     start_new_session=True)
        process = Process(name, popen, log_path, ready_file)
        self.started.append(process)
        return process

    def stop(self) -> None:
        child_pids = []
        for process in self.started:
            if process.ready_file.exists():  # `tandem serve` lists its children's ids
                child_pids += json.loads(process.ready_file.read_text()).get("pids", {}).values()
        for process in reversed(self.started):
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in reversed(self.started):
            try:
                process.popen.wait(30)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()
        for pid in child_pids:  # normally already stopped by the launcher
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


_STUBS = {"prefill": worker_pb2_grpc.PrefillWorkerStub, "decode": worker_pb2_grpc.DecodeWorkerStub}


def worker_stats(address: str, role: str) -> worker_pb2.WorkerStats:
    with grpc.insecure_channel(address) as channel:
        return _STUBS[role](channel).GetStats(worker_pb2.GetStatsRequest(), timeout=10)


def wait_for_empty_pools(workers: dict[str, str], timeout_seconds: float = 30.0) -> dict[str, worker_pb2.WorkerStats]:
    """`workers`: address -> role. Polls until every worker has all KV blocks free and nothing
    running, waiting or leased; returns the last stats by address."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        stats = {address: worker_stats(address, role) for address, role in workers.items()}
        if all(_is_idle(s) for s in stats.values()) or time.monotonic() > deadline:
            return stats
        time.sleep(0.2)


def _is_idle(stats: worker_pb2.WorkerStats) -> bool:
    return (stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0
            and stats.num_waiting == 0 and stats.num_held_leases == 0)


def is_serving(address: str) -> bool:
    try:
        return check_health(address, timeout_s=5.0) == "SERVING"
    except grpc.RpcError:
        return False
