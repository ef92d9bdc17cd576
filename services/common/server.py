"""Server bootstrap shared by the frontend and the workers.

Lifecycle: `start_server` binds the port and serves health (NOT_SERVING) and reflection at once, so
orchestrators can probe while the model loads; the service calls `mark_serving()` when it is ready;
`wait_for_shutdown` returns on SIGINT/SIGTERM, flips health to NOT_SERVING and stops with a grace period.

When a part the service cannot run without dies (a worker's engine thread), `fail_service(reason)` turns
every server of the process NOT_SERVING and makes `wait_for_shutdown` raise `ServiceFailed`: the
service's main stops the server and the process exits non-zero, so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.tls import ClientTLS, ServerTLS
from services.common.errors import StatusInterceptor

logger = logging.getLogger(__name__)

# Messages stay small (no KV bytes over gRPC), but prompts as token ids can reach a few MB.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


# SO_REUSEPORT off: a second server on a taken port fails to bind instead of silently sharing it.
# On (`reuse_port`) only where processes share a port on purpose (`tandem frontend --api-server-count`).
def _server_options(reuse_port: bool) -> list[tuple[str, object]]:
    return [*_CHANNEL_OPTIONS, ("grpc.so_reuseport", int(reuse_port))]


class ServiceFailed(RuntimeError):
    """A part the service cannot run without died; the process must exit non-zero."""


@dataclass(eq=False)
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    service_names: list[str]  # full names, e.g. "tandem.v1.Generation"
    port: int  # the bound port (useful when asked for port 0)
    loop: asyncio.AbstractEventLoop | None = None  # the loop serving it (fail_service reaches it from any thread)
    failure: str | None = None  # why fail_service turned it NOT_SERVING for good
    _tasks: set = field(default_factory=set)

    async def mark_serving(self) -> None:
        if self.failure is not None:  # a dead service never comes back SERVING
            return
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_seconds: float = 5.0) -> None:
        _running_servers.discard(self)
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_seconds)

    async def _set_health(self, status) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    def _fail(self, reason: str) -> None:  # on the loop
        self.failure = reason
        task = asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


# What fail_service reaches: the servers started and not stopped, and the pending wait_for_shutdown calls.
_running_servers: set[RunningServer] = set()
_shutdown_waiters: set[asyncio.Future] = set()


def fail_service(reason: str) -> None:
    """Thread-safe: every server of this process turns NOT_SERVING (for good) and `wait_for_shutdown`
    raises ServiceFailed(reason). One service runs per process (tests aside, where all its servers fail)."""
    logger.critical("service failed: %s", reason)
    for running in list(_running_servers):
        _call_soon(running.loop, running._fail, reason)
    for waiter in list(_shutdown_waiters):
        _call_soon(waiter.get_loop(), lambda w=waiter: w.done() or w.set_exception(ServiceFailed(reason)))


def _call_soon(loop: asyncio.AbstractEventLoop | None, callback, *args) -> None:
    if loop is None:
        return
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # that loop is closed: nothing of it is left to fail
        pass


async def start_server(
    add_servicers: Callable[[grpc.aio.Server], None],
    service_names: list[str],
    host: str,
    port: int,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    tls: ServerTLS | None = None,
    reuse_port: bool = False,
) -> RunningServer:
    """Starts a grpc.aio server with Tandem's servicers, health (NOT_SERVING) and reflection; OSError
    (one line naming the port) when `host:port` cannot be bound, e.g. another server holds it.

    `interceptors` (tracing) run outside the status mapping, so their spans see the final status.
    `tls`: serve TLS only (health and reflection included); plaintext without it.
    `reuse_port`: bind with SO_REUSEPORT, beside other processes of this user serving the same port
    (the kernel spreads connections among them).
    """
    server = grpc.aio.server(interceptors=[*interceptors, StatusInterceptor()], options=_server_options(reuse_port))
    add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        if tls is None:
            bound_port = server.add_insecure_port(f"{host}:{port}")
        else:
            bound_port = server.add_secure_port(f"{host}:{port}", tls.grpc_credentials())
    except RuntimeError:  # grpc's own message only points at GRPC_VERBOSITY
        bound_port = 0
    if bound_port == 0:
        raise OSError(f"cannot listen on {host}:{port}: port {port} is in use (or {host} is not an address "
                      f"of this machine)")
    await server.start()
    logger.info("listening on %s:%d (%s%s)", host, bound_port, ", ".join(service_names),
                "" if tls is None else f"; TLS{', client certificates required' if tls.is_mutual else ''}")
    running = RunningServer(server, health_servicer, list(service_names), bound_port, asyncio.get_running_loop())
    _running_servers.add(running)
    return running


async def wait_for_shutdown() -> str:
    """Blocks until SIGINT or SIGTERM; returns the signal's name. Raises ServiceFailed on `fail_service`."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: received.done() or received.set_result(s.name))
    _shutdown_waiters.add(received)
    try:
        return await received
    finally:
        _shutdown_waiters.discard(received)


def write_ready_file(path: str | None, **fields) -> None:
    """Atomically writes `fields` as JSON to `path` (how launchers learn ports bound as 0)."""
    if not path:
        return
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "w") as f:
        json.dump(fields, f)
    os.replace(tmp_path, path)


def channel(address: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = (), tls: ClientTLS | None = None,
            options: Sequence[tuple[str, object]] = tuple(_CHANNEL_OPTIONS)) -> grpc.aio.Channel:
    """A client channel with Tandem's message size limits (and tracing interceptors): TLS with `tls`,
    plaintext without. `options` replace the default ones (keep the size limits among them)."""
    interceptors = list(interceptors) or None
    if tls is None:
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)
    return grpc.aio.secure_channel(address, tls.grpc_credentials(), options=list(options), interceptors=interceptors)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


# How long a thread may hold the GIL while another waits for it (CPython's default is 5 ms). A service
# runs an engine thread, a gRPC loop, the UCX loop and its progress thread; a KV hand-off or a token
# crosses several of them, and at 5 ms a hop a busy engine thread adds tens of milliseconds to each.
# TANDEM_GIL_SWITCH_INTERVAL_MS overrides it (bench/kv_transfer.py measures what it does to a hand-off).
GIL_SWITCH_INTERVAL_SECONDS = 0.0005


def gil_switch_interval_seconds(environ=os.environ) -> float:
    """The switch interval a service sets: TANDEM_GIL_SWITCH_INTERVAL_MS if given, else the default."""
    text = environ.get("TANDEM_GIL_SWITCH_INTERVAL_MS")
    if text is None:
        return GIL_SWITCH_INTERVAL_SECONDS
    try:
        milliseconds = float(text)
    except ValueError:
        raise ValueError(f"TANDEM_GIL_SWITCH_INTERVAL_MS: expected milliseconds, got {text!r}") from None
    if not 0.001 <= milliseconds <= 100:
        raise ValueError(f"TANDEM_GIL_SWITCH_INTERVAL_MS: must be in [0.001, 100], got {milliseconds:g}")
    return milliseconds / 1000


def configure_process(log_level: str = "INFO") -> None:
    """Process-wide set-up every service does first: logging, and a short GIL switch interval."""
    configure_logging(log_level)
    sys.setswitchinterval(gil_switch_interval_seconds())
