"""What the observability e2e tests share: a 1 + 1 + 1 system of real processes, trace look-ups in an
OtlpCollector, and /metrics scrapes."""

from __future__ import annotations

import collections
import time
import zlib
import urllib.request
from dataclasses import dataclass

import grpc
from prometheus_client.parser import text_string_to_metric_families

from common.otlp_collector import CollectedSpan, OtlpCollector
from common.tracing import Attr
from common.transfer.protocol import layout_from_pb
from protos import generation_pb2 as g
from protos import generation_pb2_grpc, kv_layout_pb2
from tests.e2e.cluster import ENGINE_ARGS, Processes, service_env

PREFILL_RPC = "/tandem.worker.v1.PrefillWorker/Prefill"
DECODE_RPC = "/tandem.worker.v1.DecodeWorker/Decode"
# (service.name, span name) of every span one request must produce, the root `generate {model}` aside.
REQUIRED_SPANS = {
    ("tandem-frontend", "tokenize"), ("tandem-frontend", "route"), ("tandem-frontend", PREFILL_RPC),
    ("tandem-frontend", DECODE_RPC), ("tandem-frontend", "detokenize"),
    ("tandem-prefill", PREFILL_RPC), ("tandem-prefill", "prefill.queue"), ("tandem-prefill", "prefill.forward"),
    ("tandem-prefill", "kv.send"),
    ("tandem-decode", DECODE_RPC), ("tandem-decode", "decode.queue"), ("tandem-decode", "kv.recv"),
    ("tandem-decode", "decode.generate"),
}
# Spans leave each service in batches; 100 ms instead of the SDK's 5 s keeps the tests quick.
BATCH_DELAY_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "100"}


def clean_env() -> dict[str, str]:
    """The services' environment without any tracing setting from the caller's shell."""
    env = {k: v for k, v in service_env().items()
           if not k.startswith("OTEL_") and k not in ("TANDEM_OTLP_TRACES_ENDPOINT", "TANDEM_METRICS_PORT")}
    return {**env, **BATCH_DELAY_ENV}


@dataclass
class System:
    frontend: str  # host:port of each service's gRPC server
    prefill: str
    decode: str
    ready: dict[str, dict]  # role -> its ready file (ports, otlp_traces_endpoint)

    @property
    def workers(self) -> dict[str, str]:
        return {self.prefill: "prefill", self.decode: "decode"}

    def metrics_port(self, role: str) -> int:
        return self.ready[role]["metrics_port"]


def start_system(processes: Processes, prefix: str, extra_argv: list[str]) -> System:
    """A prefill and a decode worker (started together), then a frontend routing to them."""
    env = clean_env()
    prefill = processes.start(f"{prefix}-prefill", ["prefill", "--port", "0", *extra_argv, *ENGINE_ARGS], env)
    decode = processes.start(f"{prefix}-decode", ["decode", "--port", "0", *extra_argv, *ENGINE_ARGS], env)
    ready = {"prefill": prefill.ready_info(), "decode": decode.ready_info()}
    prefill_address, decode_address = (f"localhost:{ready[r]['port']}" for r in ("prefill", "decode"))
    frontend = processes.start(f"{prefix}-frontend", [
        "frontend", "--port", "0", "--http-port", "-1", *extra_argv,
        "--prefill-addresses", prefill_address, "--decode-addresses", decode_address], env)
    ready["frontend"] = frontend.ready_info()
    return System(f"localhost:{ready['frontend']['port']}", prefill_address, decode_address, ready)


def generate(address: str, request_id: str, num_prompt_tokens: int, max_tokens: int,
             metadata: tuple = ()) -> g.Final:
    """One greedy request on a token-id prompt of exactly `num_prompt_tokens`; returns its Final.

    Each request id gets a prompt of its own (its first token differs), so no request finds another's
    blocks in a worker's prefix cache: every hand-off moves its prompt's whole blocks."""
    first = 1000 + zlib.crc32(request_id.encode()) % 30000
    request = g.GenerateRequest(
        request_id=request_id, token_ids=g.TokenIds(ids=list(range(first, first + num_prompt_tokens))),
        sampling=g.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    with grpc.insecure_channel(address) as channel:
        responses = list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=120,
                                                                               metadata=metadata))
    return responses[-1].final


def model_name(address: str) -> str:
    with grpc.insecure_channel(address) as channel:
        return generation_pb2_grpc.GenerationStub(channel).GetModelInfo(g.GetModelInfoRequest(), timeout=30).model_name


def kv_bytes(num_prompt_tokens: int, layout: kv_layout_pb2.KVLayout) -> int:
    """Bytes of the whole blocks that hold the prompt's KV (every layer, K and V)."""
    kv_layout = layout_from_pb(layout)
    return -(-num_prompt_tokens // kv_layout.block_size) * kv_layout.bytes_per_block


# ---- traces -------------------------------------------------------------------------------------

def _root_trace_ids(spans: list[CollectedSpan], request_id: str) -> set[str]:
    return {s.trace_id for s in spans
            if s.name.startswith("generate ") and s.attributes.get(Attr.REQUEST_ID) == request_id}


def request_trace(collector: OtlpCollector, request_id: str, timeout: float = 30.0) -> list[CollectedSpan]:
    """Every span of the trace whose root names `request_id`, once all REQUIRED_SPANS arrived."""

    def is_complete(spans: list[CollectedSpan]) -> bool:
        trace_ids = _root_trace_ids(spans, request_id)
        present = {(s.service_name, s.name) for s in spans if s.trace_id in trace_ids}
        return len(trace_ids) == 1 and REQUIRED_SPANS <= present

    spans = collector.wait_for_spans(is_complete, timeout)
    time.sleep(0.5)  # five batch delays: anything else of this trace (there should be nothing) lands too
    (trace_id,) = _root_trace_ids(spans, request_id)
    return [s for s in collector.spans() if s.trace_id == trace_id]


def tree_root(spans: list[CollectedSpan]) -> CollectedSpan:
    """Asserts the spans form ONE tree (unique ids, one root, every span reachable); returns the root."""
    by_id = {s.span_id: s for s in spans}
    assert len(by_id) == len(spans), "duplicate span ids"
    roots = [s for s in spans if s.parent_span_id not in by_id]
    assert len(roots) == 1, f"{len(roots)} roots: {[(r.service_name, r.name) for r in roots]}"
    children = collections.defaultdict(list)
    for span in spans:
        children[span.parent_span_id].append(span.span_id)
    reached, stack = set(), [roots[0].span_id]
    while stack:
        span_id = stack.pop()
        reached.add(span_id)
        stack.extend(children[span_id])
    assert reached == set(by_id), "spans not reachable from the root"
    return roots[0]


def only(spans: list[CollectedSpan], service: str, name: str, kind: str | None = None) -> CollectedSpan:
    found = [s for s in spans if s.service_name == service and s.name == name and kind in (None, s.kind)]
    assert len(found) == 1, f"{len(found)} spans {service}/{name} ({kind})"
    return found[0]


# ---- metrics ------------------------------------------------------------------------------------

def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of a service's /metrics as (name, labels, value)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of `name`'s samples whose labels include `labels`."""
    return sum(value for sample_name, sample_labels, value in samples
               if sample_name == name and labels.items() <= sample_labels.items())
