"""`tandem frontend --api-server-count N`: N frontend processes serving the same gRPC and HTTP ports.

    tandem frontend --api-server-count 4 --decode-addresses h1:50063 [--port 50051] [--http-port 8000]

    tandem frontend (this module: no loop, no tokenizer) ── reserves the ports, starts the API servers,
     │                                                      writes the ready file, serves --metrics-port
     ├── API server 0: tandem frontend <same flags> --api-server-index 0 ─┐ each binds the gRPC and HTTP ports
     ├── API server 1                                                     │ with SO_REUSEPORT; the kernel
     └── ...                                                              ┘ spreads new connections among them

Each API server is a whole frontend: its own asyncio loop, router (polling every worker's GetStats), one
DecodeStream per decode worker, and admission. `--max-num-requests` is per process, not divided: the
kernel spreads connections, not requests (one gRPC channel's streams all land in one process), so a
divided limit would refuse one client while the other processes idle; the workers' own admission bounds
the cluster. The whole frontend holds at most N x --max-num-requests open requests. An `Abort` comes over
the caller's own connection, the one its Generate came over, so it reaches the process that runs it.

Ports: --port 0 / --http-port 0 become concrete free ports chosen once here. Each port is held by a socket
of this process (bound, never listening, so it gets no connections) from before the API servers start to
the end: nothing else can take it meanwhile. It is bound before SO_REUSEPORT is set on it, so a port
another program serves is refused here, in one line, as with N = 1.

Lifecycle:

    reserve ports ─► start N ─► each one's ready file (it is SERVING) ─► the ready file ─► supervise
       SIGTERM / SIGINT ─► SIGTERM to each, SIGKILL after STOP_GRACE_SECONDS ─► exit 0
       an API server exits ─► SIGTERM to the others ─► exit 1

An API server that dies is not restarted: the frontend fails as a whole, as vLLM's does, and whatever
runs it (`tandem serve`, systemd, a container runtime) restarts it. A restarted process would listen
before it is ready, so for a while some connections would get UNAVAILABLE and a health check NOT_SERVING
depending on which process the kernel picked; one health answer for the whole frontend is worth more.
Each API server gets SIGTERM if this process dies (PR_SET_PDEATHSIG).

Metrics: the API servers share a prometheus_client multiprocess directory (PROMETHEUS_MULTIPROC_DIR, as
vLLM sets for its API servers), so any of them answers /metrics on the HTTP port with every process's
metrics merged, and --metrics-port is served here, merged the same way: one scrape target, the series
a single process would have. `tandem:api_server_requests_total{api_server}` tells the processes apart.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from common.metrics import MULTIPROCESS_DIR_VARIABLE, MetricsServer, merged_registry, start_metrics_server
from services.common.server import write_ready_file
from services.supervisor import describe_exit, die_with_parent

logger = logging.getLogger("tandem.frontend")

STOP_GRACE_SECONDS = 20.0  # an API server's own shutdown: up to 5 s of HTTP and 5 s of gRPC grace, and more
_POLL_SECONDS = 0.1


def add_api_server_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--api-server-count", type=int, default=int(os.environ.get("TANDEM_API_SERVER_COUNT", "1")),
                        help="frontend processes serving the same gRPC and HTTP ports (SO_REUSEPORT; env "
                             "TANDEM_API_SERVER_COUNT); each has its own loop, router and --max-num-requests")
    parser.add_argument("--api-server-index", type=int, default=None, help=argparse.SUPPRESS)  # set for each


def is_api_server_parent(args: argparse.Namespace) -> bool:
    """True for the process that starts the API servers (given --api-server-count > 1, not one of them)."""
    return args.api_server_count > 1 and args.api_server_index is None


def reserve_port(host: str, port: int, what: str) -> socket.socket:
    """A socket bound to host:port (0: a free port), never listening, that the API servers bind beside.

    Bound without SO_REUSEPORT, so OSError (one line) when anything serves the port; set afterwards,
    so that processes of this user binding with it join."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    holder = socket.socket(family, socket.SOCK_STREAM)
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers: TIME_WAIT leftovers do not count
    try:
        holder.bind((host, port))
    except OSError as exc:
        holder.close()
        raise OSError(f"cannot listen on {host}:{port} ({what}): {exc.strerror}") from None
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    return holder


@dataclass
class ApiServer:
    index: int
    process: subprocess.Popen
    ready_file: Path

    def is_ready(self) -> bool:
        return self.ready_file.exists()


class ApiServers:
    """Starts the API servers, waits for them, watches them, stops them."""

    def __init__(self, argv: list[str], count: int, work_dir: Path):
        self.argv = list(argv)  # this process's own flags: every API server gets them, then its overrides
        self.count = count
        self.work_dir = work_dir
        self.metrics_dir = work_dir / "prometheus"
        self.metrics_dir.mkdir()
        self.servers: list[ApiServer] = []

    def start(self, port: int, http_port: int) -> None:
        env = dict(os.environ, **{MULTIPROCESS_DIR_VARIABLE: str(self.metrics_dir)})
        for index in range(self.count):
            ready_file = self.work_dir / f"api-server-{index}.ready.json"
            overrides = ["--port", str(port), "--http-port", str(http_port), "--metrics-port", "-1",
                         "--api-server-index", str(index), "--ready-file", str(ready_file)]  # the last value wins
            process = subprocess.Popen([sys.executable, "-m", "services.cli", "frontend", *self.argv, *overrides],
                                       env=env, start_new_session=True, preexec_fn=die_with_parent)
            self.servers.append(ApiServer(index, process, ready_file))

    def first_exit(self) -> str | None:
        """How the first API server that exited did, e.g. 'API server 1 (pid 42) was killed by SIGKILL'."""
        for server in self.servers:
            code = server.process.poll()
            if code is not None:
                return f"API server {server.index} (pid {server.process.pid}) {describe_exit(code)}"
        return None

    def all_ready(self) -> bool:
        return all(server.is_ready() for server in self.servers)

    def ready_info(self) -> dict:
        """API server 0's ready file: the ports and tracing endpoint every one of them has."""
        return json.loads(self.servers[0].ready_file.read_text())

    @property
    def pids(self) -> list[int]:
        return [server.process.pid for server in self.servers]

    def stop(self, grace_seconds: float = STOP_GRACE_SECONDS) -> None:
        """SIGTERM to every one still running; SIGKILL to those not gone after `grace_seconds`."""
        for server in self.servers:
            if server.process.poll() is None:
                server.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_seconds
        for server in self.servers:
            try:
                server.process.wait(max(deadline - time.monotonic(), 0.0))
            except subprocess.TimeoutExpired:
                logger.warning("API server %d (pid %d) still running after %.0fs: killing it", server.index,
                               server.process.pid, grace_seconds)
                server.process.kill()
                server.process.wait()


class _StopSignal:
    """SIGTERM / SIGINT, noted (the supervising loop polls it)."""

    def __init__(self):
        self.name: str | None = None
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._note)

    def _note(self, signum, _frame) -> None:
        self.name = self.name or signal.Signals(signum).name


def run_api_servers(argv: list[str], args: argparse.Namespace, host: str, port: int, http_port: int) -> int:
    """Runs `args.api_server_count` API servers until SIGTERM/SIGINT (exit 0) or until one exits (exit 1).
    `argv`: the frontend's command line; `http_port` -1: no HTTP API."""
    holders: list[socket.socket] = []
    try:
        holders.append(reserve_port(host, port, "--port"))
        if http_port >= 0:
            holders.append(reserve_port(host, http_port, "--http-port"))
    except OSError as exc:
        for holder in holders:
            holder.close()
        print(f"tandem frontend: {exc}")
        return 2
    ports = [holder.getsockname()[1] for holder in holders]
    stop_signal = _StopSignal()
    work_dir = Path(tempfile.mkdtemp(prefix="tandem-frontend-"))
    servers = ApiServers(argv, args.api_server_count, work_dir)
    metrics_server: MetricsServer | None = None
    try:
        servers.start(ports[0], ports[1] if http_port >= 0 else -1)  # before any thread of ours (preexec_fn)
        if args.metrics_port >= 0:
            try:
                metrics_server = start_metrics_server(args.metrics_port, merged_registry(str(servers.metrics_dir)))
            except OSError as exc:
                print(f"tandem frontend: cannot serve --metrics-port {args.metrics_port}: {exc.strerror}")
                return 2
        return _supervise(servers, stop_signal, args.ready_file, metrics_server)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second signal must not cut the shutdown short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        servers.stop()
        if metrics_server is not None:
            metrics_server.close()
        for holder in holders:
            holder.close()
        shutil.rmtree(work_dir, ignore_errors=True)


def _supervise(servers: ApiServers, stop_signal: _StopSignal, ready_file: str | None,
               metrics_server: MetricsServer | None) -> int:
    """Waits for every API server, writes the ready file, then watches them; the exit code."""
    is_ready = False
    while stop_signal.name is None:
        exited = servers.first_exit()
        if exited is not None:
            when = "" if is_ready else " before every API server was ready"
            logger.error("%s%s: stopping the frontend (an API server is not restarted)", exited, when)
            return 1
        if not is_ready and servers.all_ready():
            is_ready = True
            info = servers.ready_info()
            write_ready_file(ready_file, port=info["port"], http_port=info["http_port"],
                             metrics_port=metrics_server.port if metrics_server else None,
                             otlp_traces_endpoint=info["otlp_traces_endpoint"], api_server_pids=servers.pids)
            logger.info("frontend serving on port %d with %d API server processes (pids %s)", info["port"],
                        servers.count, ", ".join(map(str, servers.pids)))
        time.sleep(_POLL_SECONDS)
    logger.info("%s received, stopping %d API servers", stop_signal.name, servers.count)
    return 0
