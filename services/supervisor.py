"""`tandem serve`'s services as child processes: started, waited for, kept up, stopped.

    start ─► running ─► ready file + SERVING ─► up ──exits (killed, crashed, non-zero)──┐
      ▲                                                                                  │
      └──── after a back-off: 1, 2, 4 … 30 s; 1 s again once it had stayed up 60 s ◄─────┘

Only workers restart, each with the command line it last ran and its gRPC port pinned to the one it
bound first (`--port N`): the frontend knows workers by address and polls their GetStats, so it routes
to a restarted worker again as soon as it answers SERVING there. A restarted worker that is not ready
within the ready timeout is killed and restarted in turn. The frontend is not restarted: its death is
the caller's to handle (`tandem serve` stops everything). Every child gets SIGTERM if this process
dies (PR_SET_PDEATHSIG), so no service outlives it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.healthcheck import check_health
from common.tls import ClientTLS

STOP_GRACE_SECONDS = 15.0


@dataclass
class Backoff:
    """Delays between restarts: doubling from `initial_seconds` up to `max_seconds`, back to the
    start once the process had stayed up `reset_after_seconds`."""

    initial_seconds: float = 1.0
    max_seconds: float = 30.0
    reset_after_seconds: float = 60.0
    _next_seconds: float | None = None

    def next_delay(self, uptime_seconds: float) -> float:
        """The wait before restarting a process that ran `uptime_seconds` before it died."""
        if self._next_seconds is None or uptime_seconds >= self.reset_after_seconds:
            self._next_seconds = self.initial_seconds
        delay = self._next_seconds
        self._next_seconds = min(delay * 2, self.max_seconds)
        return delay


@dataclass
class Service:
    name: str  # e.g. "prefill-0"
    process: subprocess.Popen
    ready_file: Path
    log_path: Path
    address: str = ""  # host:port once ready
    http_url: str = ""  # the frontend's OpenAI-compatible API, e.g. http://localhost:8000/v1
    argv: list[str] = field(default_factory=list)  # `tandem <argv>` without --ready-file; has --host, --port
    is_restartable: bool = False  # workers are restarted when they die; the frontend is not
    backoff: Backoff = field(default_factory=Backoff)
    started_at: float = 0.0  # time.monotonic() of the latest start
    ready_at: float | None = None  # time.monotonic() when it answered SERVING since its latest start
    restart_at: float | None = None  # when a dead worker is started again

    @property
    def is_ready(self) -> bool:
        return self.ready_at is not None

    def flag(self, name: str) -> str | None:
        """The value of `name` in its command line (the last one wins, as in argparse)."""
        indices = [i for i, arg in enumerate(self.argv[:-1]) if arg == name]
        return self.argv[indices[-1] + 1] if indices else None

    def pin_port(self, port: int) -> None:
        """Restarts bind the port it bound first (asked for --port 0)."""
        index = max(i for i, arg in enumerate(self.argv[:-1]) if arg == "--port")
        self.argv[index + 1] = str(port)

    def log_tail(self, num_lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        return ""


def die_with_parent() -> None:
    """Child side of fork: get SIGTERM if the process that started it dies, so no service outlives it."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def describe_exit(code: int) -> str:
    """'exited with code 1' or 'was killed by SIGKILL'."""
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


def dial_address(host: str | None, port: int) -> str:
    """Where to reach a server bound to `host:port` from this machine."""
    host = "localhost" if host in (None, "", "0.0.0.0", "::") else host
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_serving(address: str, tls: ClientTLS | None = None) -> bool:
    try:
        return check_health(address, timeout_s=2.0, tls=tls) == "SERVING"
    except Exception:  # noqa: BLE001 - not up (yet)
        return False


class Launcher:
    """Starts services, waits for them, restarts dead workers, stops everything."""

    health_tls: ClientTLS | None = None  # how health checks dial services that serve TLS (set by tandem serve)

    def __init__(self, log_dir: Path, threads_per_service: int, ready_timeout_seconds: float = 600.0):
        self.log_dir = log_dir
        self.services: list[Service] = []
        self.ready_timeout_seconds = ready_timeout_seconds
        self.command = [sys.executable, "-m", "services.cli"]  # `tandem`, followed by a service's argv
        self._env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_service), PYTHONUNBUFFERED="1")

    def start(self, name: str, argv: list[str], is_restartable: bool = False) -> Service:
        service = Service(name, None, self.log_dir / f"{name}.ready.json", self.log_dir / f"{name}.log",
                          argv=list(argv), is_restartable=is_restartable)
        self._spawn(service, log_mode="w")
        self.services.append(service)
        return service

    def _spawn(self, service: Service, log_mode: str = "a") -> None:
        service.ready_file.unlink(missing_ok=True)
        with open(service.log_path, log_mode) as log:
            service.process = subprocess.Popen(
                [*self.command, *service.argv, "--ready-file", str(service.ready_file)],
                stdout=log, stderr=subprocess.STDOUT, env=self._env, start_new_session=True,
                preexec_fn=die_with_parent,
            )
        service.started_at = time.monotonic()
        service.ready_at = service.restart_at = None

    def wait_ready(self, services: list[Service], timeout_seconds: float) -> None:
        """Waits until every service wrote its ready file and answers SERVING; raises on death/timeout."""
        deadline = time.monotonic() + timeout_seconds
        pending = list(services)
        while pending:
            for service in list(pending):
                self.check_alive(service)
                if self._poll_ready(service):
                    pending.remove(service)
            if pending and time.monotonic() > deadline:
                tails = "".join(f"\n--- {s.name} ---\n{s.log_tail()}" for s in pending)
                raise RuntimeError(f"not ready after {timeout_seconds:.0f}s: "
                                   f"{', '.join(s.name for s in pending)}{tails}")
            time.sleep(0.2)

    def _poll_ready(self, service: Service) -> bool:
        if not service.is_ready and service.ready_file.exists():
            port = json.loads(service.ready_file.read_text())["port"]
            service.address = dial_address(service.flag("--host"), port)
            if is_serving(service.address, self.health_tls):
                service.ready_at = time.monotonic()
                if service.is_restartable:
                    service.pin_port(port)
        return service.is_ready

    def check_alive(self, service: Service) -> None:
        code = service.process.poll()
        if code is not None:
            raise RuntimeError(f"{service.name} {describe_exit(code)}; last log lines:\n{service.log_tail()}")

    def supervise(self) -> list[Service]:
        """One round: schedules the restart of dead workers, starts those due, checks restarted ones.
        Returns the workers that came back SERVING; raises RuntimeError when a service that is not
        restarted (the frontend) died."""
        back = []
        now = time.monotonic()
        for service in self.services:
            code = service.process.poll()
            if code is None:
                if not service.is_ready and self._poll_ready(service):
                    print(f"{service.name} is back on {service.address} (pid {service.process.pid})", flush=True)
                    back.append(service)
                elif not service.is_ready and now - service.started_at > self.ready_timeout_seconds:
                    print(f"{service.name} not ready after {self.ready_timeout_seconds:.0f}s: killing it", flush=True)
                    service.process.kill()
                continue
            if not service.is_restartable:
                self.check_alive(service)
            if service.restart_at is None:
                delay = service.backoff.next_delay(now - service.ready_at if service.is_ready else 0.0)
                service.restart_at = now + delay
                last_line = service.log_tail(1) if code > 0 else ""
                print(f"{service.name} (pid {service.process.pid}) {describe_exit(code)}"
                      f"{f' ({last_line})' if last_line else ''}; restarting it in {delay:g}s on {service.address}",
                      flush=True)
            elif now >= service.restart_at:
                self._spawn(service)
        return back

    def stop_all(self) -> None:
        """SIGTERM in reverse start order (frontend first), SIGKILL whatever outlives the grace period."""
        stop_processes([service.process for service in reversed(self.services)], STOP_GRACE_SECONDS)


def stop_processes(processes: list[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM each (in the order given), then SIGKILL whatever outlives the grace period."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
