"""`tandem serve`: the whole system on one machine, each service its own process.

    tandem serve [--num-prefill 1] [--num-decode 1] [--port 50051] [engine flags, e.g. --model, --block-size]
                 [--device cuda:0 | --prefill-devices 0 --decode-devices 1]
                 [--prefill-gpu-memory-utilization X] [--decode-gpu-memory-utilization Y]

Checks the flags and places the workers (`services.placement`: which GPU, what share of it), starts
P prefill and D decode workers (free ports; engine flags are passed to each), waits until they
are SERVING, starts the frontend pointed at them, waits for it, then prints where to connect. Ctrl-C
or SIGTERM stops every service (frontend first); if any service dies, the rest are stopped too.
Services log to files under --log-dir (a fresh temporary folder by default).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.healthcheck import check_health
from services.placement import PlacementFlags, WorkerPlacement, describe, place_workers

_STOP_GRACE_SECONDS = 15.0


@dataclass
class Service:
    name: str  # e.g. "prefill-0"
    process: subprocess.Popen
    ready_file: Path
    log_path: Path
    address: str = ""  # host:port once ready
    http_url: str = ""  # the frontend's OpenAI-compatible API, e.g. http://localhost:8000/v1

    def log_tail(self, num_lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        return ""


def _die_with_parent() -> None:
    """Child side of fork: get SIGTERM if the launcher dies, so no service outlives it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Launcher:
    def __init__(self, log_dir: Path, threads_per_service: int):
        self.log_dir = log_dir
        self.services: list[Service] = []
        self._env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_service), PYTHONUNBUFFERED="1")

    def start(self, name: str, argv: list[str]) -> Service:
        ready_file = self.log_dir / f"{name}.ready.json"
        ready_file.unlink(missing_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", *argv, "--ready-file", str(ready_file)],
                stdout=log, stderr=subprocess.STDOUT, env=self._env, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        service = Service(name, process, ready_file, log_path)
        self.services.append(service)
        return service

    def wait_ready(self, services: list[Service], timeout_seconds: float) -> None:
        """Waits until every service wrote its ready file and answers SERVING; raises on death/timeout."""
        deadline = time.monotonic() + timeout_seconds
        pending = list(services)
        while pending:
            for service in list(pending):
                self.check_alive(service)
                if service.ready_file.exists():
                    port = json.loads(service.ready_file.read_text())["port"]
                    service.address = f"localhost:{port}"
                    if _is_serving(service.address):
                        pending.remove(service)
            if pending and time.monotonic() > deadline:
                names = ", ".join(s.name for s in pending)
                raise RuntimeError(f"not ready after {timeout_seconds:.0f}s: {names} (logs in {self.log_dir})")
            time.sleep(0.2)

    def check_alive(self, service: Service) -> None:
        code = service.process.poll()
        if code is not None:
            raise RuntimeError(f"{service.name} exited with code {code}; last log lines:\n{service.log_tail()}")

    def stop_all(self) -> None:
        """SIGTERM in reverse start order (frontend first), SIGKILL whatever outlives the grace period."""
        for service in reversed(self.services):
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _STOP_GRACE_SECONDS
        for service in reversed(self.services):
            try:
                service.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait()


def _is_serving(address: str) -> bool:
    try:
        return check_health(address, timeout_s=2.0) == "SERVING"
    except Exception:  # noqa: BLE001 - not up yet
        return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem serve", description=__doc__.split("\n")[0],
                                     epilog="Unrecognized flags (engine flags) are passed to every worker.")
    parser.add_argument("--num-prefill", type=int, default=1, help="prefill workers to start")
    parser.add_argument("--num-decode", type=int, default=1, help="decode workers to start")
    parser.add_argument("--device", default="auto",
                        help="auto, cpu, cuda or cuda:N: every worker there, sharing the GPU's memory by role")
    parser.add_argument("--prefill-devices", nargs="+", default=[], metavar="GPU",
                        help="GPU indices for prefill workers (round-robin), e.g. 0 or 0,1; with --decode-devices")
    parser.add_argument("--decode-devices", nargs="+", default=[], metavar="GPU",
                        help="GPU indices for decode workers (round-robin), e.g. 1 or 1 2 3")
    parser.add_argument("--prefill-gpu-memory-utilization", type=float, default=None, metavar="SHARE",
                        help="each prefill worker's share of its GPU (default 0.25 beside decode workers)")
    parser.add_argument("--decode-gpu-memory-utilization", type=float, default=None, metavar="SHARE",
                        help="each decode worker's share of its GPU (default: what is left of 0.9, split evenly)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--host", default="0.0.0.0", help="frontend bind address")
    parser.add_argument("--port", type=int, default=50051, help="frontend port (0 = any free port)")
    parser.add_argument("--http-port", type=int, default=8000,
                        help="frontend's OpenAI-compatible HTTP port (0 = any free port, -1 = off)")
    parser.add_argument("--model", default=None, help="model for every service; default: the embedded SmolLM2")
    parser.add_argument("--kv-lease-seconds", type=float, default=None, help="prefill workers' KV lease")
    parser.add_argument("--threads-per-service", type=int, default=1, help="torch threads in each service")
    parser.add_argument("--ready-timeout", type=float, default=600.0, help="seconds to wait for every service")
    parser.add_argument("--log-dir", default=None, help="where services log (default: a new temporary folder)")
    parser.add_argument("--ready-file", default=None, help="write every service's address here as JSON once up")
    return parser


def plan_workers(args: argparse.Namespace, num_gpus: int | None) -> list[WorkerPlacement]:
    """Checks the placement flags (ValueError: one line naming the flag) before anything starts."""
    if args.gpu_memory_utilization is not None:
        raise ValueError("--gpu-memory-utilization is per worker here: use --prefill-gpu-memory-utilization "
                         "and --decode-gpu-memory-utilization")
    flags = PlacementFlags(args.num_prefill, args.num_decode, args.device, tuple(args.prefill_devices),
                           tuple(args.decode_devices), args.prefill_gpu_memory_utilization,
                           args.decode_gpu_memory_utilization)
    return place_workers(flags, num_gpus)


def worker_argv(placement: WorkerPlacement, args: argparse.Namespace, engine_argv: list[str]) -> list[str]:
    """The `tandem prefill|decode` command line of one worker."""
    model_argv = ["--model", args.model] if args.model else []
    lease_argv = ["--kv-lease-seconds", str(args.kv_lease_seconds)] if args.kv_lease_seconds else []
    role_argv = lease_argv if placement.role == "prefill" else []
    return [placement.role, "--port", "0", *model_argv, *role_argv, *placement.argv(), *engine_argv]


def visible_gpu_count() -> int | None:
    """GPUs the workers will see (CUDA_VISIBLE_DEVICES, else NVML; no CUDA context); None if unknown."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        entries = [entry.strip() for entry in visible.split(",")]  # CUDA stops at the first invalid entry
        return next((i for i, entry in enumerate(entries) if not entry or entry.startswith("-")), len(entries))
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return 0  # no driver: no GPU
    try:
        return pynvml.nvmlDeviceGetCount()
    finally:
        pynvml.nvmlShutdown()


def _start_system(launcher: Launcher, args: argparse.Namespace, engine_argv: list[str],
                  placements: list[WorkerPlacement]) -> Service:
    model_argv = ["--model", args.model] if args.model else []
    workers = [launcher.start(p.name, worker_argv(p, args, engine_argv)) for p in placements]
    prefills = [w for w, p in zip(workers, placements) if p.role == "prefill"]
    decodes = [w for w, p in zip(workers, placements) if p.role == "decode"]
    for line in describe(placements):
        print(line, flush=True)
    print(f"starting {args.num_prefill} prefill and {args.num_decode} decode workers (logs in {launcher.log_dir})",
          flush=True)
    launcher.wait_ready([*prefills, *decodes], args.ready_timeout)
    frontend = launcher.start("frontend", [
        "frontend", "--host", args.host, "--port", str(args.port), "--http-port", str(args.http_port), *model_argv,
        "--prefill-addresses", ",".join(s.address for s in prefills),
        "--decode-addresses", ",".join(s.address for s in decodes),
    ])
    launcher.wait_ready([frontend], args.ready_timeout)
    http_port = json.loads(frontend.ready_file.read_text()).get("http_port")
    frontend.http_url = f"http://localhost:{http_port}/v1" if http_port is not None else ""
    if args.ready_file:
        Path(args.ready_file).write_text(json.dumps({
            "frontend": frontend.address,
            "http": frontend.http_url,
            "prefill": [s.address for s in prefills],
            "decode": [s.address for s in decodes],
            "pids": {s.name: s.process.pid for s in launcher.services},
        }))
    return frontend


def main(argv: list[str]) -> int:
    args, engine_argv = build_parser().parse_known_args(argv)
    try:
        placements = plan_workers(args, visible_gpu_count())
    except ValueError as exc:
        print(f"tandem serve: {exc}", file=sys.stderr)
        return 2
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tandem-serve-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(log_dir, args.threads_per_service)
    stop_requested: list[str] = []

    def request_stop(signum, _frame) -> None:
        stop_requested.append(signal.Signals(signum).name)
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: it may arrive ignored from a parent shell
        signal.signal(sig, request_stop)
    try:
        frontend = _start_system(launcher, args, engine_argv, placements)
        print(f"Tandem is serving on {frontend.address} (tandem.v1.Generation; Ctrl-C stops it)")
        print(f'try:  tandem generate --address {frontend.address} "What is the capital of France?"', flush=True)
        if frontend.http_url:
            print(f"OpenAI-compatible HTTP API: {frontend.http_url} (curl {frontend.http_url}/models)", flush=True)
        while True:
            for service in launcher.services:
                launcher.check_alive(service)
            time.sleep(0.5)
    except KeyboardInterrupt:
        print(f"\nstopping ({stop_requested[0] if stop_requested else 'SIGINT'})", flush=True)
        return 0
    except RuntimeError as exc:
        print(f"tandem serve: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second signal must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        launcher.stop_all()
