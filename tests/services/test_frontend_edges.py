"""The gRPC frontend against hostile and abusive callers: undecodable messages, oversized prompts,
bursts past the request limit, Abort from another connection, client cancels, and the API key."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generation_pb2 as g
from protos import generation_pb2_grpc
from services.common.errors import Cancelled, InvalidRequest
from services.frontend.app import FrontendApp, FrontendConfig
from services.frontend.servicer import GenerationServicer

PROMPT = list(range(100, 121))
GENERATE = "/tandem.v1.Generation/Generate"


def _long_request(request_id: str = "") -> g.GenerateRequest:
    return g.GenerateRequest(request_id=request_id, token_ids=g.TokenIds(ids=PROMPT),
                             sampling=g.SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))


def _raw_generate(address: str, payload: bytes) -> grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_stream(GENERATE, request_serializer=lambda raw: raw,
                                    response_deserializer=g.GenerateResponse.FromString)
        with pytest.raises(grpc.RpcError) as info:
            list(call(payload, timeout=10))
    return info.value


def _errors(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


def test_undecodable_messages_are_invalid_argument_without_an_error_log(system, caplog):
    text = g.GenerateRequest(text="hi there").SerializeToString()
    request_id = g.GenerateRequest(request_id="abc", text="hi").SerializeToString()
    cases = {
        "text": text.replace(b"hi there", b"hi \xff\xfehere"),
        "request_id": request_id.replace(b"abc", b"a\xc3("),
        "corrupt": b"\xff\xff\xff\xff",
    }
    with caplog.at_level(logging.INFO):
        for name, payload in cases.items():
            error = _raw_generate(system.frontend_address, payload)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, error.code(), error.details())
            assert "GenerateRequest" in error.details(), error.details()
    assert not _errors(caplog)


@pytest.mark.parametrize("field, request_pb", [
    ("text", g.GenerateRequest(text="x" * 1001)),
    ("chat.messages", g.GenerateRequest(chat=g.ChatMessages(messages=[
        g.ChatMessage(role="user", content="y" * 600), g.ChatMessage(role="user", content="y" * 600)]))),
    ("sampling.stop[1]", g.GenerateRequest(text="hi", sampling=g.SamplingParams(stop=["a", "s" * 1025]))),
    ("sampling.max_tokens", g.GenerateRequest(text="hi", sampling=g.SamplingParams(max_tokens=129))),
])
def test_size_limits_refuse_before_tokenization(make_system, monkeypatch, field, request_pb):
    system = make_system(frontend_overrides={"max_prompt_chars": 1000})
    tokenized = []
    monkeypatch.setattr(system.app, "tokenize", lambda request: tokenized.append(request) or [1, 2, 3])
    with grpc.insecure_channel(system.frontend_address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            list(generation_pb2_grpc.GenerationStub(channel).Generate(request_pb, timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field), info.value.details()
    assert not tokenized


def test_a_burst_is_admitted_up_to_the_limit_and_no_further(system, tokenizer):
    """200 requests at once, a limit of 50: the count is taken before tokenization's await."""
    async def burst() -> tuple[int, int, int]:
        config = FrontendConfig([system.prefill_address], [system.decode_address], max_num_requests=50,
                                stats_refresh_seconds=0.1)
        app = FrontendApp(config, tokenizer, "tiny")
        await app.start()
        while not app.router.is_ready():
            await asyncio.sleep(0.02)
        release = asyncio.Event()
        num_tokenizing = 0

        async def slow_tokenize(request):
            nonlocal num_tokenizing
            num_tokenizing += 1
            await release.wait()
            raise InvalidRequest("text", "stopped by the test")

        app.prompt_token_ids = slow_tokenize

        async def one(index: int) -> str:
            try:
                async for _ in app.generate(g.GenerateRequest(request_id=f"burst-{index}", text="hi"), lambda: None):
                    pass
            except Exception as exc:  # noqa: BLE001
                return type(exc).__name__
            return "done"

        tasks = [asyncio.create_task(one(i)) for i in range(200)]
        await asyncio.sleep(0.5)
        admitted = num_tokenizing
        release.set()
        outcomes = await asyncio.gather(*tasks)
        num_still_taken = app.admission.num_taken
        await app.close()
        return admitted, outcomes.count("InvalidRequest"), outcomes.count("RequestsExhausted"), num_still_taken

    admitted, num_tokenized, num_refused, num_still_taken = system.run(burst())
    assert (admitted, num_tokenized, num_refused) == (50, 50, 150)
    assert num_still_taken == 0  # every slot came back


def test_overload_is_resource_exhausted_with_a_retry_hint(make_system):
    system = make_system(frontend_overrides={"max_num_requests": 1})
    with grpc.insecure_channel(system.frontend_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        stream = stub.Generate(_long_request())
        next(stream)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(_long_request(), timeout=10))
        stream.cancel()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert dict(info.value.trailing_metadata())["retry-after"] == "1"
    system.wait_until_idle()


def test_abort_only_reaches_the_callers_own_requests(system):
    other_connection = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(system.frontend_address) as owner_channel, \
            grpc.insecure_channel(system.frontend_address, options=other_connection) as other_channel:
        owner = generation_pb2_grpc.GenerationStub(owner_channel)
        other = generation_pb2_grpc.GenerationStub(other_channel)
        stream = owner.Generate(_long_request("owned"))
        next(stream)
        assert not other.Abort(g.AbortRequest(request_id="owned")).was_running
        responses = list(stream)  # not cancelled: it runs to its end
        assert responses[-1].final.usage.completion_tokens == 100
        stream = owner.Generate(_long_request("owned"))
        next(stream)
        assert owner.Abort(g.AbortRequest(request_id="owned")).was_running
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.CANCELLED
    system.wait_until_idle()


def test_an_abort_while_the_consumer_holds_the_stream_ends_it_at_the_next_item(system, tokenizer):
    """An Abort that arrives while the stream is suspended at its yield (gRPC sending the last message)
    must not cancel the consumer's own await: grpc.aio ends an RPC cancelled there with no status, and
    the caller would wait until its deadline. The stream raises Cancelled at its next item instead."""
    async def abort_between_items() -> int:
        config = FrontendConfig([system.prefill_address], [system.decode_address], stats_refresh_seconds=0.1)
        app = FrontendApp(config, tokenizer, "tiny")
        await app.start()
        while not app.router.is_ready():
            await asyncio.sleep(0.02)
        items = app.generate(_long_request("held"), lambda: None, caller="owner")
        try:
            await anext(items)
            assert app.abort("held", "owner")
            await asyncio.sleep(0.05)  # the consumer's own await: cancelled here, this test would fail
            with pytest.raises(Cancelled, match="request held was aborted"):
                await anext(items)
            assert not app.abort("held", "owner")  # gone: its Abort entry was dropped
        finally:
            await items.aclose()
            await app.close()
        return app.admission.num_taken

    assert system.run(abort_between_items()) == 0  # its slot came back
    system.wait_until_idle()


class _ServicerContext:
    """What GenerationServicer.Generate reads of a grpc.aio context."""

    def time_remaining(self):
        return None

    def invocation_metadata(self):
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:1"

    def set_trailing_metadata(self, metadata) -> None:
        pass


async def _cancelled_while_sending(servicer: GenerationServicer) -> None:
    """What grpc.aio does when a client cancels while a response is being written: the handler task is
    cancelled outside the stream's generator, which gRPC drops and the loop's finalizer closes later."""
    first = asyncio.Event()

    async def handler() -> None:
        async for _ in servicer.Generate(_long_request(), _ServicerContext()):
            first.set()
            await asyncio.sleep(30)  # writing the response; the client cancels here

    task = asyncio.create_task(handler())
    await first.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    for _ in range(20):  # the finalizer's aclose() runs as a task of its own
        gc.collect()
        await asyncio.sleep(0.05)


def test_a_client_cancel_counts_as_abort_and_logs_no_error(make_system, caplog):
    system = make_system()
    registry = system.observability["frontend"].metrics.registry

    def finished(reason: str) -> float:
        return registry.get_sample_value("tandem:request_success_total", {
            "model_name": "tiny", "role": "frontend", "finished_reason": reason}) or 0

    with caplog.at_level(logging.INFO):
        system.run(_cancelled_while_sending(GenerationServicer(system.app)))
        system.wait_until_idle()
        with grpc.insecure_channel(system.frontend_address) as channel:  # and a plain cancel over gRPC
            stream = generation_pb2_grpc.GenerationStub(channel).Generate(_long_request())
            next(stream)
            stream.cancel()
            system.wait_until_idle()
        deadline = time.monotonic() + 5
        while finished("abort") + finished("error") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert (finished("abort"), finished("error")) == (2, 0)
    assert not _errors(caplog), _errors(caplog)


def test_api_key_guards_generation_but_not_health(make_system):
    system = make_system(frontend_overrides={"api_key": "sesame"})
    with grpc.insecure_channel(system.frontend_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for metadata in [None, [("authorization", "Bearer wrong")], [("authorization", "sesame")]]:
            for call in (lambda: list(stub.Generate(g.GenerateRequest(text="hi"), metadata=metadata, timeout=10)),
                         lambda: stub.Abort(g.AbortRequest(request_id="x"), metadata=metadata),
                         lambda: stub.GetModelInfo(g.GetModelInfoRequest(), metadata=metadata)):
                with pytest.raises(grpc.RpcError) as info:
                    call()
                assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        key = [("authorization", "Bearer sesame")]
        assert stub.GetModelInfo(g.GetModelInfoRequest(), metadata=key).model_name == "tiny"
        request = g.GenerateRequest(text="hi", sampling=g.SamplingParams(max_tokens=2, ignore_eos=True))
        assert list(stub.Generate(request, metadata=key))[-1].final.usage.completion_tokens == 2
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
