"""A worker whose engine thread died says so: health NOT_SERVING for good, GetStats not ready, calls
UNAVAILABLE instead of hanging, and `wait_for_shutdown` raises so the process exits non-zero."""

import asyncio
import pathlib
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generation_pb2 as g
from protos import generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.server import ServiceFailed, fail_service, start_server, wait_for_shutdown
REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SERVICE = "tandem.worker.v1.DecodeWorker"


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=SERVICE)).status


def test_fail_service_turns_servers_not_serving_for_good_and_ends_wait_for_shutdown():
    async def run():
        server = await start_server(lambda s: None, [SERVICE], "127.0.0.1", 0)
        await server.mark_serving()
        waiter = asyncio.ensure_future(wait_for_shutdown())
        await asyncio.sleep(0.05)
        threading.Thread(target=fail_service, args=("engine thread died",)).start()
        with pytest.raises(ServiceFailed, match="engine thread died"):
            await asyncio.wait_for(waiter, 5)
        await server.mark_serving()  # too late: a failed service never comes back
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            status = (await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE))).status
        await server.stop(0)
        return status

    assert asyncio.run(run()) == health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_service_main_exits_non_zero_when_its_service_fails():
    script = """
import asyncio, threading
from services.common.server import fail_service, start_server, wait_for_shutdown

async def main():  # what every service's main does: serve until a signal, then stop
    running = await start_server(lambda s: None, ["x.Y"], "127.0.0.1", 0)
    await running.mark_serving()
    threading.Timer(0.2, fail_service, ("engine thread died",)).start()
    try:
        await wait_for_shutdown()
    finally:
        await running.stop(0)

asyncio.run(main())
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and "ServiceFailed: engine thread died" in done.stderr, done.stderr


def test_a_dead_decode_engine_ends_its_streams_and_refuses_new_work(make_system, monkeypatch):
    system = make_system()
    with grpc.insecure_channel(system.frontend_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        stream = stub.Generate(g.GenerateRequest(token_ids=g.TokenIds(ids=[9] * 12), sampling=g.SamplingParams(
            max_tokens=100, ignore_eos=True)), timeout=60)
        next(stream)
        next(stream)  # decoding on the decode worker

        def broken_refresh():
            raise RuntimeError("bug outside any request")

        monkeypatch.setattr(system.decode_worker, "_refresh_stats", broken_refresh)
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        # The frontend tries to move the stream to a ready decode worker: the error names the dead engine,
        # or, when the frontend already saw the worker NOT_SERVING, that no decode worker is left.
        details = info.value.details()
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "engine" in details or "no decode worker is ready" in details, details
        assert not system.decode_worker.is_alive
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:  # a later request fails at once instead of hanging
            list(stub.Generate(g.GenerateRequest(text="hello", sampling=g.SamplingParams(max_tokens=4)), timeout=30))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 10
    assert _health(system.decode_address) == health_pb2.HealthCheckResponse.NOT_SERVING
    with grpc.insecure_channel(system.decode_address) as channel:
        decode = worker_pb2_grpc.DecodeWorkerStub(channel)
        assert not decode.GetStats(worker_pb2.GetStatsRequest()).is_ready
        with pytest.raises(grpc.RpcError) as info:
            list(decode.Decode(worker_pb2.DecodeRequest(request_id="late", prompt_token_ids=[1]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
