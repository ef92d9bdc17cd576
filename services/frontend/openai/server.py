"""Runs the HTTP API with uvicorn inside the frontend's asyncio loop, next to the grpc.aio server.

    http = await start_http_server(app, host, port)   # port 0 = any free port; http.port is the bound one
    http = await start_http_server(app, host, port, tls=ServerTLS(...))   # HTTPS only
    http.mark_ready()                                  # /health answers 200 from now on
    await http.stop()

Both servers share one loop, so HTTP handlers call `FrontendApp` directly (no threads, no copies).
uvicorn's own signal handling is switched off: the frontend's `wait_for_shutdown` owns SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field

import uvicorn

from common.tls import ServerTLS
from services.frontend.app import FrontendApp
from services.frontend.openai.routes import create_app

logger = logging.getLogger(__name__)

_START_TIMEOUT_SECONDS = 30.0


class _EmbeddedServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
        yield  # the host process handles signals


@dataclass
class HttpServer:
    port: int  # the bound port
    _server: _EmbeddedServer
    _task: asyncio.Task
    _ready: list[bool] = field(default_factory=lambda: [False])

    def mark_ready(self) -> None:
        self._ready[0] = True

    async def stop(self, grace_seconds: float = 5.0) -> None:
        """Stops accepting, lets open responses finish for `grace_seconds`, then cancels them."""
        self._ready[0] = False
        self._server.config.timeout_graceful_shutdown = grace_seconds
        self._server.should_exit = True
        try:
            await asyncio.wait_for(self._task, grace_seconds + 5.0)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            self._task.cancel()


def _bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # beside the other API server processes on this port (the kernel spreads connections)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"could not bind the HTTP port {host}:{port}: {exc}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


async def start_http_server(app: FrontendApp, host: str, port: int, tls: ServerTLS | None = None,
                            reuse_port: bool = False) -> HttpServer:
    """Binds host:port and serves the OpenAI-compatible API for `app` in the running loop (HTTPS only
    with `tls`, requiring client certificates when it says so); `reuse_port`: with SO_REUSEPORT, beside
    the other API server processes of `tandem frontend --api-server-count`."""
    if not 0 <= port <= 65535:
        raise ValueError(f"http_port: must be in [0, 65535], got {port}")
    sock = _bind(host, port, reuse_port)
    bound_port = sock.getsockname()[1]
    ready = [False]
    api = create_app(app, is_ready=lambda: ready[0])
    config = uvicorn.Config(api, lifespan="off", log_config=None, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5, **(tls.uvicorn_kwargs() if tls else {}))
    server = _EmbeddedServer(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    deadline = asyncio.get_running_loop().time() + _START_TIMEOUT_SECONDS
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("the HTTP server exited while starting")
        if asyncio.get_running_loop().time() > deadline:
            task.cancel()
            raise RuntimeError(f"the HTTP server did not start within {_START_TIMEOUT_SECONDS:.0f}s")
        await asyncio.sleep(0.01)
    logger.info("OpenAI-compatible HTTP API on %s://%s:%d/v1", "http" if tls is None else "https", host, bound_port)
    return HttpServer(bound_port, server, task, ready)
