"""Server bootstrap shared by the frontend and the workers.

Lifecycle: `start_server` binds the port and serves health (NOT_SERVING) and reflection at once, so
orchestrators can probe while the model loads; the service calls `mark_serving()` when it is ready;
`wait_for_shutdown` returns on SIGINT/SIGTERM, flips health to NOT_SERVING and stops with a grace period.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.errors import StatusInterceptor

logger = logging.getLogger(__name__)

# Messages stay small (no KV bytes over gRPC), but prompts as token ids can reach a few MB.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    service_names: list[str]  # full names, e.g. "tandem.v1.Generation"
    port: int  # the bound port (useful when asked for port 0)

    async def mark_serving(self) -> None:
        for name in ["", *self.service_names]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_seconds: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_seconds)


async def start_server(
    add_servicers: Callable[[grpc.aio.Server], None],
    service_names: list[str],
    host: str,
    port: int,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """Starts a grpc.aio server with Tandem's servicers, health (NOT_SERVING) and reflection.

    `interceptors` (tracing) run outside the status mapping, so their spans see the final status.
    """
    server = grpc.aio.server(interceptors=[*interceptors, StatusInterceptor()], options=_CHANNEL_OPTIONS)
    add_servicers(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ["", *service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    bound_port = server.add_insecure_port(f"{host}:{port}")
    if bound_port == 0:
        raise OSError(f"could not bind {host}:{port}")
    await server.start()
    logger.info("listening on %s:%d (%s)", host, bound_port, ", ".join(service_names))
    return RunningServer(server, health_servicer, list(service_names), bound_port)


async def wait_for_shutdown() -> str:
    """Blocks until SIGINT or SIGTERM; returns the signal's name."""
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda s=sig: received.done() or received.set_result(s.name))
    return await received


def write_ready_file(path: str | None, **fields) -> None:
    """Atomically writes `fields` as JSON to `path` (how launchers learn ports bound as 0)."""
    if not path:
        return
    tmp_path = f"{path}.tmp{os.getpid()}"
    with open(tmp_path, "w") as f:
        json.dump(fields, f)
    os.replace(tmp_path, path)


def channel(address: str, interceptors: Sequence[grpc.aio.ClientInterceptor] = ()) -> grpc.aio.Channel:
    """An insecure client channel with Tandem's message size limits (and tracing interceptors)."""
    return grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS, interceptors=list(interceptors) or None)


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
