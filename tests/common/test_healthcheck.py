"""`python -m common.healthcheck` against a real grpc.aio server's health service."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
import threading

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from common.healthcheck import check_health, main

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@contextlib.contextmanager
def health_server(status: int):
    """A grpc.aio server with only the health service, on an event-loop thread of its own."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        await servicer.set("", status)
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_serving_exits_zero_in_a_subprocess():
    with health_server(SERVING) as address:
        result = subprocess.run(
            [sys.executable, "-m", "common.healthcheck", "--address", address],
            capture_output=True, text=True, timeout=60,
        )
    assert result.returncode == 0, result.stderr
    assert "SERVING" in result.stdout


def test_not_serving_and_unreachable_exit_one():
    with health_server(NOT_SERVING) as address:
        assert check_health(address) == "NOT_SERVING"
        assert main(["--address", address]) == 1
        assert main(["--address", address, "--service", "tandem.v1.Unknown"]) == 1  # NOT_FOUND
    assert main(["--address", f"127.0.0.1:{_closed_port()}", "--timeout", "1"]) == 1


def test_bad_arguments():
    assert main(["--address", "no-port"]) == 2
    with pytest.raises(ValueError, match="timeout_s"):
        check_health("127.0.0.1:1", timeout_s=0)
