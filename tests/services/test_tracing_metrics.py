"""One trace per request across frontend, prefill, decode and the KV hand-off; metrics on every service."""

import grpc

from common.otlp_collector import OtlpCollector
from common.tracing import Attr
from protos import generation_pb2 as g
from protos import generation_pb2_grpc

EXPECTED = {  # span name -> service that records it
    "generate tiny": "tandem-frontend",
    "tokenize": "tandem-frontend",
    "prefill.queue": "tandem-prefill",
    "prefill.forward": "tandem-prefill",
    "kv.send": "tandem-prefill",
    "decode.queue": "tandem-decode",
    "kv.recv": "tandem-decode",
    "decode.generate": "tandem-decode",
}


def test_one_request_is_one_trace_over_every_hop_and_is_counted(make_system):
    with OtlpCollector() as collector:
        system = make_system(otlp_endpoint=collector.endpoint)
        with grpc.insecure_channel(system.frontend_address) as channel:
            responses = list(generation_pb2_grpc.GenerationStub(channel).Generate(g.GenerateRequest(
                text="Hello there", sampling=g.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))))
        assert responses[-1].final.usage.completion_tokens == 6
        for observability in system.observability.values():
            observability.tracing.force_flush()
        spans = collector.wait_for_spans(lambda spans: {s.name for s in spans} >= set(EXPECTED), timeout=10)
        system.stop()  # while the collector still listens: exporters flush on shutdown
    by_name = {s.name: s for s in spans}
    assert {by_name[name].service_name for name in EXPECTED} == set(EXPECTED.values())
    root = by_name["generate tiny"]
    assert root.parent_span_id == "" and root.kind == "SERVER"
    assert all(by_name[name].trace_id == root.trace_id for name in EXPECTED)
    assert by_name["kv.send"].parent_span_id == by_name["kv.recv"].span_id  # crossed the hand-off
    assert by_name["kv.recv"].attributes[Attr.KV_BYTES] > 0 and by_name["kv.recv"].attributes[Attr.KV_TRANSPORT] == "fake"
    assert root.attributes[Attr.OUTPUT_TOKENS] == 6 and Attr.TIME_TO_FIRST_TOKEN in root.attributes
    rpc_spans = [s for s in spans if s.name.startswith("/tandem.worker.v1.")]
    assert {(s.name.rsplit("/", 1)[1], s.kind) for s in rpc_spans} >= {
        ("Prefill", "CLIENT"), ("Prefill", "SERVER"), ("Decode", "CLIENT"), ("Decode", "SERVER")}
    assert not any("GetStats" in s.name for s in spans)

    frontend = system.observability["frontend"].metrics.registry
    decode = system.observability["decode"].metrics.registry
    prefill = system.observability["prefill"].metrics.registry
    labels = {"model_name": "tiny"}
    assert frontend.get_sample_value("tandem:time_to_first_token_seconds_count", {**labels, "role": "frontend"}) == 1
    assert frontend.get_sample_value("tandem:request_success_total",
                                     {**labels, "role": "frontend", "finished_reason": "length"}) == 1
    assert decode.get_sample_value("tandem:generation_tokens_total", {**labels, "role": "decode"}) == 5
    assert prefill.get_sample_value("tandem:prompt_tokens_total", {**labels, "role": "prefill"}) == responses[-1].final.usage.prompt_tokens
    assert prefill.get_sample_value("tandem:kv_transfer_bytes_total", {**labels, "role": "prefill"}) == by_name["kv.recv"].attributes[Attr.KV_BYTES]
