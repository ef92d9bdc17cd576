"""A gRPC port belongs to one server: a second server (or worker) on it fails with one line naming
the port, instead of sharing it through SO_REUSEPORT and splitting the traffic."""

import asyncio
import socket
import subprocess
import sys

import pytest

from protos import worker_pb2_grpc
from services.common.server import start_server
from services.prefill.servicer import PrefillServicer
from tests.e2e.cluster import REPO_ROOT, service_env

SERVICE = "tandem.worker.v1.PrefillWorker"


def _add(server) -> None:
    worker_pb2_grpc.add_PrefillWorkerServicer_to_server(PrefillServicer(), server)


def test_a_second_server_on_a_taken_port_fails_naming_the_port():
    async def run():
        first = await start_server(_add, [SERVICE], "127.0.0.1", 0)
        try:
            with pytest.raises(OSError) as error:
                second = await start_server(_add, [SERVICE], "127.0.0.1", first.port)
                await second.stop(0)  # only reached when it bound the port too
            return first.port, str(error.value)
        finally:
            await first.stop(0)

    port, message = asyncio.run(run())
    assert f"cannot listen on 127.0.0.1:{port}: port {port} is in use" in message
    assert "\n" not in message


def test_a_worker_on_a_taken_port_exits_with_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "services.cli", "decode", "--host", "127.0.0.1", "--port", str(port),
             "--device", "cpu", "--kv-transfer-backend", "fake"],
            capture_output=True, text=True, timeout=120, env=service_env(), cwd=REPO_ROOT)
    assert result.returncode == 1, result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"tandem decode: cannot listen on 127.0.0.1:{port}: port {port} is in use")
