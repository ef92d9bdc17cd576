"""Traces and metrics of real processes: one frontend, one prefill and one decode worker, KV over UCX.

One traced system (module scope: an in-process OtlpCollector, every service with
--otlp-traces-endpoint and --metrics-port) serves every test but the tracing-off one, which starts
its own system with neither flag nor environment.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from common import tracing
from common.otlp_collector import OtlpCollector
from common.tracing import Attr
from protos import generation_pb2 as g
from protos.generation_pb2_grpc import GenerationStub
from tests.e2e.cluster import Processes, wait_for_empty_pools, worker_stats
from tests.e2e.observability_helpers import (
    DECODE_RPC, PREFILL_RPC, generate, kv_bytes, model_name, only, request_trace, scrape,
    start_system, total, tree_root,
)

OTLP_DEFAULT_PORT = 4317  # where an OTLP exporter sends when it is given no endpoint at all


@pytest.fixture(scope="module")
def traced(tmp_path_factory):
    """(system, collector, model name, KV layout) of the shared traced system."""
    processes = Processes(tmp_path_factory.mktemp("observability"))
    with OtlpCollector() as collector:
        try:
            system = start_system(processes, "traced", ["--otlp-traces-endpoint", collector.endpoint,
                                                        "--metrics-port", "0"])
            layout = worker_stats(system.decode, "decode").layout
            yield system, collector, model_name(system.frontend), layout
        finally:
            processes.stop()


def test_one_request_is_one_tree_over_three_services_with_exact_kv_bytes(traced):
    system, collector, model, layout = traced
    final = generate(system.frontend, "obs-one", num_prompt_tokens=37, max_tokens=4)  # 37 tokens: 3 blocks
    spans = request_trace(collector, "obs-one")

    root = tree_root(spans)
    assert (root.name, root.service_name, root.kind, root.parent_span_id) == (
        f"generate {model}", "tandem-frontend", "SERVER", "")
    assert {s.service_name for s in spans} == {"tandem-frontend", "tandem-prefill", "tandem-decode"}
    tagged = {s.trace_id for s in collector.spans() if s.attributes.get(Attr.REQUEST_ID) == "obs-one"}
    assert tagged == {root.trace_id}  # prefill's and decode's spans joined the frontend's trace

    def parent(service: str, name: str, kind: str | None = None):
        return next(s for s in spans if s.span_id == only(spans, service, name, kind).parent_span_id)

    for name in ("tokenize", "detokenize"):
        assert parent("tandem-frontend", name) is root
    routes = [s for s in spans if s.name == "route"]
    assert all(s.parent_span_id == root.span_id for s in routes)
    assert {(s.attributes[Attr.ROUTE_ROLE], s.attributes[Attr.ROUTE_ADDRESS]) for s in routes} == {
        ("prefill", system.prefill), ("decode", system.decode)}
    for rpc, worker, children in ((PREFILL_RPC, "tandem-prefill", ("prefill.queue", "prefill.forward")),
                                  (DECODE_RPC, "tandem-decode", ("decode.queue", "kv.recv", "decode.generate"))):
        client = only(spans, "tandem-frontend", rpc, "CLIENT")
        server = only(spans, worker, rpc, "SERVER")
        assert client.parent_span_id == root.span_id and server.parent_span_id == client.span_id
        assert all(parent(worker, child) is server for child in children)
    kv_send, kv_recv = only(spans, "tandem-prefill", "kv.send"), only(spans, "tandem-decode", "kv.recv")
    assert kv_send.parent_span_id == kv_recv.span_id  # the context crossed the UCX pull

    expected_bytes = kv_bytes(final.usage.prompt_tokens, layout)
    for kv_span in (kv_send, kv_recv):
        assert kv_span.attributes[Attr.KV_BYTES] == expected_bytes
        assert kv_span.attributes[Attr.KV_BLOCKS] == 3
        assert kv_span.attributes[Attr.KV_TRANSPORT] not in ("", "fake")

    assert (final.usage.prompt_tokens, final.usage.completion_tokens) == (37, 4)
    assert root.attributes[Attr.INPUT_TOKENS] == final.usage.prompt_tokens
    assert root.attributes[Attr.OUTPUT_TOKENS] == final.usage.completion_tokens
    assert root.attributes[Attr.FINISH_REASONS] == ["length"]
    assert 0 < root.attributes[Attr.TIME_TO_FIRST_TOKEN] < root.duration_ns / 1e9
    assert only(spans, "tandem-prefill", "prefill.forward").attributes[Attr.INPUT_TOKENS] == 37
    assert only(spans, "tandem-decode", "decode.generate").attributes[Attr.OUTPUT_TOKENS] == 4
    assert only(spans, "tandem-frontend", "detokenize").attributes[Attr.OUTPUT_TOKENS] == 4
    assert all(s.status != "ERROR" for s in spans)


def test_span_count_does_not_grow_with_output_length(traced):
    system, collector, _, _ = traced
    names = {}
    for max_tokens in (4, 16):
        final = generate(system.frontend, f"obs-len-{max_tokens}", num_prompt_tokens=20, max_tokens=max_tokens)
        assert final.usage.completion_tokens == max_tokens
        spans = request_trace(collector, f"obs-len-{max_tokens}")
        names[max_tokens] = sorted((s.service_name, s.name, s.kind) for s in spans)
    assert names[4] == names[16]


def test_a_request_failing_validation_marks_the_root_span_error(traced):
    system, collector, model, _ = traced
    trace_id, caller_span_id = os.urandom(16).hex(), os.urandom(8).hex()
    request = g.GenerateRequest(text="hi", sampling=g.SamplingParams(temperature=-1.0))
    with grpc.insecure_channel(system.frontend) as channel, pytest.raises(grpc.RpcError) as error:
        traceparent = f"00-{trace_id}-{caller_span_id}-01"
        list(GenerationStub(channel).Generate(request, timeout=30, metadata=(("traceparent", traceparent),)))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    spans = collector.wait_for_spans(lambda spans: any(s.trace_id == trace_id for s in spans), timeout=30)
    time.sleep(0.5)
    spans = [s for s in collector.spans() if s.trace_id == trace_id]
    root = only(spans, "tandem-frontend", f"generate {model}")
    assert root.parent_span_id == caller_span_id  # joined the caller's trace
    assert root.status == "ERROR" and "sampling.temperature" in root.status_message
    assert {s.service_name for s in spans} == {"tandem-frontend"}  # rejected before any worker was called


def test_concurrent_requests_make_two_separate_traces(traced):
    system, collector, _, layout = traced
    prompts = {"obs-a": 20, "obs-b": 40}  # 2 and 3 blocks: a kv.send under the wrong kv.recv would show
    barrier = threading.Barrier(len(prompts))

    def run(request_id: str) -> g.Final:
        barrier.wait()
        return generate(system.frontend, request_id, prompts[request_id], max_tokens=8)

    with ThreadPoolExecutor(len(prompts)) as pool:
        finals = dict(zip(prompts, pool.map(run, prompts)))
    traces = {request_id: request_trace(collector, request_id) for request_id in prompts}
    roots = {request_id: tree_root(spans) for request_id, spans in traces.items()}
    a, b = roots["obs-a"], roots["obs-b"]
    assert a.trace_id != b.trace_id
    assert a.start_ns < b.end_ns and b.start_ns < a.end_ns  # they did run at the same time
    for request_id, spans in traces.items():
        other = traces["obs-b" if request_id == "obs-a" else "obs-a"]
        assert not {s.parent_span_id for s in spans} & {s.span_id for s in other}
        # The caller's id on the frontend's own spans; the id of this run (the caller's + "@" + hex) on
        # the spans of its trip through the workers.
        ids = {s.attributes[Attr.REQUEST_ID] for s in spans if Attr.REQUEST_ID in s.attributes}
        run_ids = ids - {request_id}
        assert request_id in ids and len(run_ids) == 1 and run_ids.pop().startswith(request_id + "@")
        expected_bytes = kv_bytes(finals[request_id].usage.prompt_tokens, layout)
        for name, service in (("kv.send", "tandem-prefill"), ("kv.recv", "tandem-decode")):
            assert only(spans, service, name).attributes[Attr.KV_BYTES] == expected_bytes


def test_metrics_add_up_after_n_requests(traced):
    system, _, model, layout = traced
    wait_for_empty_pools(system.workers)
    ports = {role: system.metrics_port(role) for role in ("frontend", "prefill", "decode")}
    before = {role: scrape(port) for role, port in ports.items()}
    prompts, max_tokens = [9, 17, 33], [12, 6, 3]
    usage_seen = []
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(generate, system.frontend, f"obs-metrics-{i}", n, m)
                   for i, (n, m) in enumerate(zip(prompts, max_tokens))]
        while not all(f.done() for f in futures):  # the decode worker's KV gauge while they run
            usage_seen.append(total(scrape(ports["decode"]), "tandem:kv_cache_usage_perc"))
            time.sleep(0.05)
        finals = [f.result() for f in futures]
    assert [f.usage.prompt_tokens for f in finals] == prompts
    assert [f.usage.completion_tokens for f in finals] == max_tokens
    assert max(usage_seen) > 0

    wait_for_empty_pools(system.workers)
    time.sleep(0.5)  # idle engine loops refresh their gauges at least this often
    after = {role: scrape(port) for role, port in ports.items()}

    def delta(role: str, name: str, **labels: str) -> float:
        return total(after[role], name, **labels) - total(before[role], name, **labels)

    num_requests = len(prompts)
    assert delta("frontend", "tandem:request_success_total") == num_requests
    assert delta("frontend", "tandem:request_success_total", finished_reason="length") == num_requests
    assert delta("frontend", "tandem:time_to_first_token_seconds_count") == num_requests
    assert delta("frontend", "tandem:e2e_request_latency_seconds_count") == num_requests
    assert delta("prefill", "tandem:prompt_tokens_total") == sum(prompts)
    assert delta("decode", "tandem:generation_tokens_total") == sum(max_tokens) - num_requests  # #1: prefill's
    expected_kv_bytes = sum(kv_bytes(n, layout) for n in prompts)
    for role in ("prefill", "decode"):
        assert delta(role, "tandem:kv_transfer_bytes_total") == expected_kv_bytes
        assert delta(role, "tandem:kv_transfer_seconds_count") == num_requests
        assert total(after[role], "tandem:kv_cache_usage_perc", model_name=model, role=role) == 0
    for role in ports:
        assert total(after[role], "tandem:num_requests_running", model_name=model, role=role) == 0


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_tracing_off_creates_no_exporter_and_sends_nothing(tmp_path):
    """No flag, no environment: the services report no endpoint and the OTLP default port gets nothing.

    Where something else already holds the default port, the collector part is left out and the
    services' own report (no endpoint) is what is checked."""
    collector = OtlpCollector(port=OTLP_DEFAULT_PORT) if _port_is_free(OTLP_DEFAULT_PORT) else None
    with collector if collector is not None else contextlib.nullcontext():
        processes = Processes(tmp_path)
        try:
            system = start_system(processes, "untraced", [])
            final = generate(system.frontend, "obs-off", num_prompt_tokens=20, max_tokens=4)
            assert final.usage.completion_tokens == 4
            time.sleep(0.5)  # five batch delays
        finally:
            processes.stop()  # a tracer provider would flush here, on shutdown
        assert {role: info["otlp_traces_endpoint"] for role, info in system.ready.items()} == {
            "frontend": None, "prefill": None, "decode": None}
        if collector is None:
            return
        assert collector.num_exports == 0 and collector.spans() == []

        probe = tracing.init_tracing("frontend", f"http://localhost:{OTLP_DEFAULT_PORT}")  # reachable?
        probe.record_span("probe", time.time_ns(), time.time_ns())
        probe.shutdown()
        assert [s.name for s in collector.spans()] == ["probe"]

