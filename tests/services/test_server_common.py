"""Server bootstrap: health is NOT_SERVING while a worker loads, then SERVING; reflection lists the
services; the one exception -> status mapping."""

import asyncio
import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.kv import OutOfKVBlocks
from common.transfer import KVLayoutMismatch, KVTransferError, KVTransferNotFound
from protos import worker_pb2, worker_pb2_grpc
from services.common.errors import Cancelled, InvalidRequest, Overloaded, Unavailable, status_for
from services.common.server import start_server
from services.prefill.servicer import PrefillServicer

SERVICE = "tandem.worker.v1.PrefillWorker"


def test_a_loading_worker_is_not_serving_and_says_so():
    async def run():
        servicer = PrefillServicer()  # no worker yet: the model is "loading"
        server = await start_server(lambda s: worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, s),
                                    [SERVICE], "127.0.0.1", 0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            prefill = worker_pb2_grpc.PrefillWorkerStub(channel)
            loading = [(await health.Check(health_pb2.HealthCheckRequest(service=name))).status for name in ("", SERVICE)]
            stats = await prefill.GetStats(worker_pb2.GetStatsRequest())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await prefill.Prefill(worker_pb2.PrefillRequest(request_id="r", prompt_token_ids=[1]))
            await server.mark_serving()
            ready = (await health.Check(health_pb2.HealthCheckRequest(service=SERVICE))).status
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            listed = []
            async for answer in reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
                listed = [s.name for s in answer.list_services_response.service]
        await server.stop(0)
        return loading, stats, info.value, ready, listed

    loading, stats, error, ready, listed = asyncio.run(run())
    assert loading == [health_pb2.HealthCheckResponse.NOT_SERVING] * 2
    assert stats.role == "prefill" and not stats.is_ready
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.details()
    assert ready == health_pb2.HealthCheckResponse.SERVING
    assert SERVICE in listed and "grpc.health.v1.Health" in listed


@pytest.mark.parametrize(("error", "code"), [
    (InvalidRequest("sampling.top_p", "must be in (0, 1]"), grpc.StatusCode.INVALID_ARGUMENT),
    (ValueError("max_tokens must be >= 1"), grpc.StatusCode.INVALID_ARGUMENT),
    (OutOfKVBlocks(4, 1), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Overloaded("queue full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Unavailable("no decode worker"), grpc.StatusCode.UNAVAILABLE),
    (Cancelled("aborted"), grpc.StatusCode.CANCELLED),
    (KVLayoutMismatch("block_size: prefill=16 decode=32"), grpc.StatusCode.FAILED_PRECONDITION),
    (KVTransferNotFound("transfer x"), grpc.StatusCode.NOT_FOUND),
    (KVTransferError("connection refused"), grpc.StatusCode.UNAVAILABLE),
    (RuntimeError("a bug"), grpc.StatusCode.INTERNAL),
])
def test_exceptions_map_to_status_codes_keeping_the_message(error, code):
    mapped_code, message = status_for(error)
    assert mapped_code == code
    assert str(error) in message


def test_a_bug_is_logged_with_the_request_id(caplog):
    async def run():
        class Broken(worker_pb2_grpc.PrefillWorkerServicer):
            async def Prefill(self, request, context):
                raise KeyError("oops")

        server = await start_server(lambda s: worker_pb2_grpc.add_PrefillWorkerServicer_to_server(Broken(), s),
                                    [SERVICE], "127.0.0.1", 0)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(
                    worker_pb2.PrefillRequest(request_id="req-42", prompt_token_ids=[1]))
        await server.stop(0)
        return info.value

    with caplog.at_level(logging.ERROR):
        error = asyncio.run(run())
    assert error.code() == grpc.StatusCode.INTERNAL and "KeyError" in error.details()
    assert any("req-42" in record.getMessage() for record in caplog.records)


def test_configure_process_shortens_the_gil_switch_interval():
    import sys

    from services.common.server import GIL_SWITCH_INTERVAL_SECONDS, configure_process

    before = sys.getswitchinterval()
    try:
        sys.setswitchinterval(0.005)  # CPython's default (an earlier test in this process may have changed it)
        configure_process("WARNING")
        assert sys.getswitchinterval() == pytest.approx(GIL_SWITCH_INTERVAL_SECONDS)
        assert GIL_SWITCH_INTERVAL_SECONDS < 0.005
    finally:
        sys.setswitchinterval(before)


def test_the_gil_switch_interval_can_be_set_from_the_environment(monkeypatch):
    import sys

    from services.common.server import GIL_SWITCH_INTERVAL_SECONDS, configure_process, gil_switch_interval_seconds

    assert gil_switch_interval_seconds({}) == GIL_SWITCH_INTERVAL_SECONDS
    assert gil_switch_interval_seconds({"TANDEM_GIL_SWITCH_INTERVAL_MS": "0.1"}) == pytest.approx(0.0001)
    for bad in ("fast", "0", "-1", "1000"):
        with pytest.raises(ValueError, match="TANDEM_GIL_SWITCH_INTERVAL_MS"):
            gil_switch_interval_seconds({"TANDEM_GIL_SWITCH_INTERVAL_MS": bad})
    before = sys.getswitchinterval()
    monkeypatch.setenv("TANDEM_GIL_SWITCH_INTERVAL_MS", "0.2")
    try:
        configure_process("WARNING")
        assert sys.getswitchinterval() == pytest.approx(0.0002)
    finally:
        sys.setswitchinterval(before)
