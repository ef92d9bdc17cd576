"""Tracing exported for real into the in-process OTLP collector, across real grpc.aio hops.

The "system" here is three handles (frontend, prefill, decode) and two grpc.aio servers speaking raw
bytes, shaped like Tandem's request path: root -> tokenize/route -> Prefill RPC -> Decode stream (whose
kv.recv pulls over a fake UCX hop on another thread, where kv.send joins the trace) -> detokenize.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace

from common import tracing
from common.otlp_collector import CollectedSpan, OtlpCollector
from common.tracing import Attr, SpanName

MODEL = "tiny-model"
PREFILL_METHOD = "/tandem.test.Worker/Prefill"
DECODE_METHOD = "/tandem.test.Worker/Decode"
STATS_METHOD = "/tandem.test.Worker/GetStats"
NUM_DECODE_TOKENS = 3
# frontend: root, tokenize, route, Prefill client, Decode client, detokenize
# prefill:  Prefill server, prefill.queue, prefill.forward, kv.send
# decode:   Decode server, decode.queue, kv.recv, decode.generate
NUM_SPANS_PER_REQUEST = 14


@pytest.fixture
def collector():
    with OtlpCollector() as running:
        yield running


@pytest.fixture(autouse=True)
def _no_otel_env(monkeypatch):
    for key in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(key, raising=False)


class FakeUcxListener:
    """The prefill side of the KV pull, on a thread of its own like a UCX progress thread."""

    def __init__(self, prefill: tracing.TracingHandle):
        self._prefill = prefill
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=2)

    def pull(self, control_message: dict) -> bytes:
        return self._pool.submit(self._send, control_message).result(timeout=10)

    def _send(self, control_message: dict) -> bytes:
        parent = tracing.extract_context(control_message["trace_context"])
        with self._prefill.start_span(SpanName.KV_SEND, parent=parent) as span:
            span.set_attribute(Attr.REQUEST_ID, control_message["request_id"])
            tracing.set_kv_transfer(span, num_bytes=4096, num_blocks=2, transport="fake", seconds=0.001)
            return b"kv" * 8

    def close(self) -> None:
        self._pool.shutdown()


def _prefill_handlers(prefill: tracing.TracingHandle):
    async def prefill_rpc(request: bytes, context) -> bytes:
        enqueued_ns = time.time_ns()
        await asyncio.sleep(0.002)
        prefill.record_span(SpanName.PREFILL_QUEUE, enqueued_ns, time.time_ns())
        with prefill.start_span(SpanName.PREFILL_FORWARD, attributes={Attr.REQUEST_ID: request.decode()}):
            await asyncio.sleep(0.002)
        return b"first-token"

    async def get_stats(request: bytes, context) -> bytes:
        return b"num_waiting=0"

    return grpc.method_handlers_generic_handler("tandem.test.Worker", {
        "Prefill": grpc.unary_unary_rpc_method_handler(prefill_rpc),
        "GetStats": grpc.unary_unary_rpc_method_handler(get_stats),
    })


def _decode_handlers(decode: tracing.TracingHandle, listener: FakeUcxListener):
    async def decode_rpc(request: bytes, context):
        request_id = request.decode()
        decode.record_span(SpanName.DECODE_QUEUE, time.time_ns() - 1000, time.time_ns())
        with decode.start_span(SpanName.KV_RECV) as span:
            message = {"request_id": request_id, "trace_context": tracing.inject_context()}
            received = await asyncio.get_running_loop().run_in_executor(None, listener.pull, message)
            span.set_attribute(Attr.KV_BYTES, len(received))
        with decode.start_span(SpanName.DECODE_GENERATE):
            for index in range(NUM_DECODE_TOKENS):
                await asyncio.sleep(0.001)
                yield f"tok{index}".encode()

    return grpc.method_handlers_generic_handler(
        "tandem.test.Worker", {"Decode": grpc.unary_stream_rpc_method_handler(decode_rpc)}
    )


async def _start_server(handle: tracing.TracingHandle, handlers) -> tuple[grpc.aio.Server, str, object]:
    server = grpc.aio.server(interceptors=handle.server_interceptors())
    server.add_generic_rpc_handlers((handlers,))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}", health_servicer


async def _generate(
    frontend: tracing.TracingHandle, to_prefill: grpc.aio.Channel, to_decode: grpc.aio.Channel, request_id: str
) -> list[bytes]:
    """The frontend's side of one request."""
    with frontend.start_request_span(MODEL, metadata=()) as root:
        root.set_attribute(Attr.REQUEST_ID, request_id)
        with frontend.start_span(SpanName.TOKENIZE):
            await asyncio.sleep(0.001)
        with frontend.start_span(SpanName.ROUTE):
            pass
        first = await to_prefill.unary_unary(PREFILL_METHOD)(request_id.encode(), timeout=10)
        tokens = [first]
        async for token in to_decode.unary_stream(DECODE_METHOD)(request_id.encode(), timeout=10):
            tokens.append(token)
        with frontend.start_span(SpanName.DETOKENIZE):
            pass
        tracing.set_usage(root, num_input_tokens=5, num_output_tokens=len(tokens), finish_reasons=["length"])
        return tokens


async def _run_system(handles: dict[str, tracing.TracingHandle], request_ids: list[str], num_health_checks: int):
    listener = FakeUcxListener(handles["prefill"])
    prefill_server, prefill_address, _ = await _start_server(handles["prefill"], _prefill_handlers(handles["prefill"]))
    decode_server, decode_address, decode_health = await _start_server(
        handles["decode"], _decode_handlers(handles["decode"], listener)
    )
    await decode_health.set("", health_pb2.HealthCheckResponse.SERVING)
    interceptors = handles["frontend"].client_interceptors()
    try:
        async with grpc.aio.insecure_channel(prefill_address, interceptors=interceptors) as to_prefill, \
                grpc.aio.insecure_channel(decode_address, interceptors=interceptors) as to_decode:
            health_stub = health_pb2_grpc.HealthStub(to_decode)
            for _ in range(num_health_checks):
                reply = await health_stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                assert await to_prefill.unary_unary(STATS_METHOD)(b"", timeout=5) == b"num_waiting=0"
            frontend = handles["frontend"]
            return await asyncio.gather(*(_generate(frontend, to_prefill, to_decode, r) for r in request_ids))
    finally:
        await prefill_server.stop(None)
        await decode_server.stop(None)
        listener.close()


def _by_trace(spans: list[CollectedSpan]) -> dict[str, list[CollectedSpan]]:
    traces: dict[str, list[CollectedSpan]] = {}
    for span in spans:
        traces.setdefault(span.trace_id, []).append(span)
    return traces


def _only(spans: list[CollectedSpan], name: str) -> CollectedSpan:
    matches = [s for s in spans if s.name == name]
    assert len(matches) == 1, f"expected one {name!r} span, got {[s.name for s in spans]}"
    return matches[0]


def test_two_concurrent_requests_make_two_separate_trees(collector):
    handles = {role: tracing.init_tracing(role, collector.endpoint) for role in ("frontend", "prefill", "decode")}
    outputs = asyncio.run(_run_system(handles, ["req-a", "req-b"], num_health_checks=3))
    assert [len(tokens) for tokens in outputs] == [1 + NUM_DECODE_TOKENS] * 2
    for handle in handles.values():
        assert handle.force_flush()
    spans = collector.wait_for_spans(lambda s: len(s) >= 2 * NUM_SPANS_PER_REQUEST)
    assert len(spans) == 2 * NUM_SPANS_PER_REQUEST, sorted(s.name for s in spans)
    untraced = [s.name for s in spans if "grpc.health" in s.name or "GetStats" in s.name]
    assert not untraced, "health checks and stats polling must not be traced"

    traces = _by_trace(spans)
    assert len(traces) == 2
    seen_request_ids = set()
    for trace_spans in traces.values():
        assert len(trace_spans) == NUM_SPANS_PER_REQUEST
        by_id = {s.span_id: s for s in trace_spans}
        roots = [s for s in trace_spans if not s.parent_span_id]
        assert [r.name for r in roots] == [f"generate {MODEL}"]
        root = roots[0]
        assert (root.service_name, root.kind) == ("tandem-frontend", "SERVER")
        assert root.attributes[Attr.REQUEST_MODEL] == MODEL
        assert root.attributes[Attr.OUTPUT_TOKENS] == 1 + NUM_DECODE_TOKENS
        assert root.attributes[Attr.FINISH_REASONS] == ["length"]
        # Every parent lives in the same trace: one tree, nothing linked across requests.
        for span in trace_spans:
            if span.parent_span_id:
                assert span.parent_span_id in by_id, f"{span.name} points outside its trace"
        request_id = root.attributes[Attr.REQUEST_ID]
        seen_request_ids.add(request_id)

        def parent_of(name: str) -> CollectedSpan:
            return by_id[_only(trace_spans, name).parent_span_id]

        for name in (SpanName.TOKENIZE, SpanName.ROUTE, SpanName.DETOKENIZE):
            assert parent_of(name).span_id == root.span_id
        prefill_server = parent_of(SpanName.PREFILL_FORWARD)
        assert (prefill_server.service_name, prefill_server.kind) == ("tandem-prefill", "SERVER")
        assert prefill_server.name == PREFILL_METHOD
        assert parent_of(SpanName.PREFILL_QUEUE).span_id == prefill_server.span_id
        prefill_client = by_id[prefill_server.parent_span_id]
        assert (prefill_client.service_name, prefill_client.kind) == ("tandem-frontend", "CLIENT")
        assert prefill_client.parent_span_id == root.span_id
        decode_server = parent_of(SpanName.KV_RECV)
        assert (decode_server.service_name, decode_server.kind) == ("tandem-decode", "SERVER")
        assert parent_of(SpanName.DECODE_GENERATE).span_id == decode_server.span_id
        assert by_id[decode_server.parent_span_id].parent_span_id == root.span_id
        # The UCX hop: kv.send (prefill, another thread) is a child of kv.recv (decode), same request.
        kv_send = _only(trace_spans, SpanName.KV_SEND)
        assert kv_send.service_name == "tandem-prefill"
        assert parent_of(SpanName.KV_SEND).name == SpanName.KV_RECV
        assert kv_send.attributes[Attr.REQUEST_ID] == request_id
        assert kv_send.attributes[Attr.KV_GBPS] == pytest.approx(4096 * 8 / 0.001 / 1e9)
        assert _only(trace_spans, SpanName.PREFILL_FORWARD).attributes[Attr.REQUEST_ID] == request_id
        assert root.start_ns <= prefill_server.start_ns <= prefill_server.end_ns <= root.end_ns
    assert seen_request_ids == {"req-a", "req-b"}
    for handle in handles.values():
        handle.shutdown()


def test_errors_set_span_status(collector):
    handle = tracing.init_tracing("decode", collector.endpoint)
    with pytest.raises(RuntimeError):
        with handle.start_span(SpanName.DECODE_GENERATE):
            raise RuntimeError("out of KV blocks")
    with handle.start_span(SpanName.KV_RECV) as span:
        tracing.set_error(span, "layout mismatch: block_size")
    handle.shutdown()
    spans = collector.wait_for_spans(lambda s: len(s) >= 2)
    by_name = {s.name: s for s in spans}
    assert by_name[SpanName.DECODE_GENERATE].status == "ERROR"
    assert "out of KV blocks" in by_name[SpanName.DECODE_GENERATE].status_message
    assert by_name[SpanName.KV_RECV].status == "ERROR"
    assert by_name[SpanName.KV_RECV].status_message == "layout mismatch: block_size"


def test_endpoint_from_environment_when_no_flag(collector, monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint)
    handle = tracing.init_tracing("prefill", None)
    assert handle.is_enabled
    with handle.start_span(SpanName.PREFILL_FORWARD):
        pass
    handle.shutdown()
    (span,) = collector.wait_for_spans(lambda s: len(s) >= 1)
    assert (span.name, span.service_name) == (SpanName.PREFILL_FORWARD, "tandem-prefill")


def test_tracing_off_creates_no_exporter_and_sends_nothing(collector, monkeypatch):
    import opentelemetry.exporter.otlp.proto.grpc.trace_exporter as exporter_module

    created = []

    class CountingExporter(exporter_module.OTLPSpanExporter):
        def __init__(self, *args, **kwargs):
            created.append(kwargs.get("endpoint"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(exporter_module, "OTLPSpanExporter", CountingExporter)
    off = tracing.init_tracing("frontend", None)
    assert not off.is_enabled
    assert isinstance(off.tracer_provider, trace.NoOpTracerProvider)
    assert isinstance(off.tracer, trace.NoOpTracer)
    assert off.server_interceptors() == [] and off.client_interceptors() == []
    with off.start_request_span(MODEL) as root:
        assert not root.is_recording()
        with off.start_span(SpanName.TOKENIZE):
            assert tracing.inject_context() == {}
    off.record_span(SpanName.PREFILL_QUEUE, 1, 2)
    assert off.force_flush()
    off.shutdown()
    assert created == []
    # The same code with an endpoint does create one exporter and sends: the spy above works.
    on = tracing.init_tracing("frontend", collector.endpoint)
    with on.start_span(SpanName.TOKENIZE):
        pass
    on.shutdown()
    assert len(created) == 1
    collector.wait_for_spans(lambda s: len(s) == 1)
    assert collector.num_exports == 1


def test_explicit_endpoint_wins_over_environment():
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4317"}
    assert tracing.resolve_endpoint("http://flag:4317", env) == "http://flag:4317"
    assert tracing.resolve_endpoint(None, env) == "http://env:4317"
    assert tracing.resolve_endpoint("", env) is None
    assert tracing.resolve_endpoint(None, {**env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "t:1"}) == "t:1"
    assert tracing.resolve_endpoint(None, {**env, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing.resolve_endpoint(None, {}) is None


@pytest.mark.parametrize("endpoint", ["grpc://collector:4317", "collector", "http://collector:port"])
def test_bad_endpoint_names_the_field(endpoint):
    with pytest.raises(ValueError, match="otlp_endpoint"):
        tracing.init_tracing("decode", endpoint)


def test_service_names_and_carrier_round_trip(collector):
    assert tracing.service_name_for("decode") == "tandem-decode"
    assert tracing.service_name_for("tandem-decode") == "tandem-decode"
    with pytest.raises(ValueError, match="service_name"):
        tracing.init_tracing("", None)
    handle = tracing.init_tracing("decode", collector.endpoint)
    with handle.start_span(SpanName.KV_RECV) as span:
        carrier = tracing.inject_context()
        expected_trace_id = format(span.get_span_context().trace_id, "032x")
    assert carrier["traceparent"].split("-")[1] == expected_trace_id
    joined = trace.get_current_span(tracing.extract_context(list(carrier.items()))).get_span_context()
    assert format(joined.trace_id, "032x") == expected_trace_id
    assert not trace.get_current_span(tracing.extract_context({})).get_span_context().is_valid
    handle.shutdown()
