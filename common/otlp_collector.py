"""A tiny in-process OTLP/gRPC trace collector: what tests and `scripts/trace_waterfall.py` read spans from.

It implements `opentelemetry.proto.collector.trace.v1.TraceService/Export` on 127.0.0.1 and keeps every
span it receives as a plain `CollectedSpan`. Not a production collector: no batching, no limits.

    with OtlpCollector() as collector:                    # free port
        tracing = init_tracing("frontend", collector.endpoint)
        ...
        spans = collector.wait_for_spans(lambda spans: len(spans) >= 3, timeout=10)

Run standalone to capture a real system's spans into JSON (then draw them with trace_waterfall.py):
    python -m common.otlp_collector --port 4317 --out spans.json      # Ctrl-C writes the file
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import pathlib
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

_STATUS_NAMES = {0: "UNSET", 1: "OK", 2: "ERROR"}
_KIND_NAMES = {0: "UNSPECIFIED", 1: "INTERNAL", 2: "SERVER", 3: "CLIENT", 4: "PRODUCER", 5: "CONSUMER"}


@dataclasses.dataclass(frozen=True)
class CollectedSpan:
    """One received span; ids are lowercase hex, parent_span_id is "" for a root."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    service_name: str  # the resource's service.name, e.g. "tandem-prefill"
    kind: str  # INTERNAL, SERVER, CLIENT, PRODUCER, CONSUMER
    attributes: dict[str, Any]
    status: str  # UNSET, OK, ERROR
    status_message: str
    start_ns: int
    end_ns: int

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CollectedSpan:
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - data.keys()
        if missing:
            raise ValueError(f"span record is missing fields {sorted(missing)}")
        return cls(**{k: data[k] for k in fields})


def _any_value(value: common_pb2.AnyValue) -> Any:
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: _any_value(kv.value) for kv in value.kvlist_value.values}
    if which == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, which)


def _attributes(key_values) -> dict[str, Any]:
    return {kv.key: _any_value(kv.value) for kv in key_values}


def spans_from_request(request: trace_service_pb2.ExportTraceServiceRequest) -> list[CollectedSpan]:
    """Flattens an OTLP export request (resource -> scope -> spans) into CollectedSpans."""
    spans = []
    for resource_spans in request.resource_spans:
        service_name = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(_convert_span(span, service_name))
    return spans


def _convert_span(span: trace_pb2.Span, service_name: str) -> CollectedSpan:
    return CollectedSpan(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        name=span.name,
        service_name=service_name,
        kind=_KIND_NAMES.get(span.kind, str(span.kind)),
        attributes=_attributes(span.attributes),
        status=_STATUS_NAMES.get(span.status.code, str(span.status.code)),
        status_message=span.status.message,
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
    )


def save_spans(spans: list[CollectedSpan], path: str | pathlib.Path) -> None:
    """Writes spans as a JSON list (the format `load_spans` and trace_waterfall.py read)."""
    pathlib.Path(path).write_text(json.dumps([dataclasses.asdict(s) for s in spans], indent=1))


def load_spans(path: str | pathlib.Path) -> list[CollectedSpan]:
    records = json.loads(pathlib.Path(path).read_text())
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of span records")
    return [CollectedSpan.from_dict(r) for r in records]


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, collector: OtlpCollector):
        self._collector = collector

    def Export(self, request, context):  # noqa: N802 (gRPC method name)
        self._collector._add(spans_from_request(request))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpCollector:
    """An OTLP/gRPC TraceService on `host:port` (0 = a free port) that stores what it receives."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1"):
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {port}")
        self._host, self._requested_port = host, port
        self._lock = threading.Condition()
        self._spans: list[CollectedSpan] = []
        self._num_exports = 0
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """What to give `init_tracing` / OTEL_EXPORTER_OTLP_ENDPOINT."""
        if self._server is None:
            raise RuntimeError("OtlpCollector is not started")
        return f"http://{self._host}:{self.port}"

    def start(self) -> OtlpCollector:
        if self._server is not None:
            return self
        server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        self.port = server.add_insecure_port(f"{self._host}:{self._requested_port}")
        if self.port == 0:
            raise OSError(f"could not bind the OTLP collector to {self._host}:{self._requested_port}")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait()
            self._server = None

    def __enter__(self) -> OtlpCollector:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _add(self, spans: list[CollectedSpan]) -> None:
        with self._lock:
            self._spans.extend(spans)
            self._num_exports += 1
            self._lock.notify_all()

    @property
    def num_exports(self) -> int:
        """How many Export calls arrived (0 proves nothing was sent)."""
        with self._lock:
            return self._num_exports

    def spans(self) -> list[CollectedSpan]:
        """A copy of every span received so far, in arrival order."""
        with self._lock:
            return list(self._spans)

    def clear(self) -> None:
        with self._lock:
            self._spans.clear()
            self._num_exports = 0

    def wait_for_spans(
        self, predicate: Callable[[list[CollectedSpan]], bool], timeout: float = 10.0
    ) -> list[CollectedSpan]:
        """Blocks until `predicate(all spans so far)` holds; raises TimeoutError naming what arrived."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while not predicate(list(self._spans)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({f"{s.service_name}/{s.name}" for s in self._spans})
                    raise TimeoutError(f"spans did not arrive within {timeout}s; received {names}")
                self._lock.wait(remaining)
            return list(self._spans)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Collect OTLP/gRPC spans and write them as JSON.", allow_abbrev=False)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4317)
    parser.add_argument("--out", required=True, help="JSON file written on Ctrl-C / SIGTERM")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with OtlpCollector(args.port, args.host) as collector:
        print(f"collecting on {collector.endpoint}; Ctrl-C to write {args.out}", flush=True)
        try:
            while not stop.wait(0.5):
                pass
        except KeyboardInterrupt:
            pass
        spans = collector.spans()
    save_spans(spans, args.out)
    print(f"wrote {len(spans)} spans to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
