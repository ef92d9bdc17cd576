"""OpenTelemetry tracing for Tandem services: one trace per request across every hop.

Set up once per service in `main` and keep the handle on the server object:

    tracing = init_tracing("prefill", args.otlp_traces_endpoint)      # None -> $OTEL_EXPORTER_OTLP_ENDPOINT
    server = grpc.aio.server(interceptors=tracing.server_interceptors())
    channel = grpc.aio.insecure_channel(addr, interceptors=tracing.client_interceptors())
    with tracing.start_span(SpanName.PREFILL_FORWARD, parent=ctx) as span: ...
    tracing.shutdown()                                                  # flushes queued spans

Off (no endpoint anywhere) means free: no exporter, no processor, a no-op tracer, no interceptors.

Where context travels:
- gRPC: the client/server interceptors carry W3C `traceparent` in metadata. The frontend's public
  server takes no interceptor: `start_request_span` opens the root `generate {model}` span itself
  (joining a caller's traceparent if one came in), so the root of the trace is that span.
- threads (the engine loop): pass `current_context()` with the command, use it as `parent=`.
- UCX: `inject_context()` into the control message's trace-context map, `extract_context()` on
  the other side; `kv.send` then becomes a child of the decode worker's `kv.recv`.
Health checks, reflection and the workers' GetStats polling are never traced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.status import Status, StatusCode

ROLES = ("frontend", "prefill", "decode", "worker")  # worker: a colocated `tandem worker`
SERVICE_NAME_PREFIX = "tandem-"
ENV_ENDPOINTS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
# gRPC calls that make no spans: probes and the frontend's load polling run every few seconds and
# would drown the request traces.
UNTRACED_GRPC_SERVICE_PREFIXES = ("grpc.health.v1", "grpc.reflection")
UNTRACED_GRPC_METHODS = ("GetStats",)

_PROPAGATOR = TraceContextTextMapPropagator()


class SpanName:
    """Every span Tandem creates; the root is `root_span_name(model)`."""

    TOKENIZE = "tokenize"
    ROUTE = "route"
    PREFILL_QUEUE = "prefill.queue"
    PREFILL_FORWARD = "prefill.forward"
    KV_SEND = "kv.send"
    DECODE_QUEUE = "decode.queue"
    KV_RECV = "kv.recv"
    DECODE_GENERATE = "decode.generate"
    DETOKENIZE = "detokenize"


class Attr:
    """Span attribute keys: GenAI semantic conventions plus Tandem's KV hand-off ones."""

    REQUEST_MODEL = "gen_ai.request.model"
    INPUT_TOKENS = "gen_ai.usage.input_tokens"
    OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
    FINISH_REASONS = "gen_ai.response.finish_reasons"
    TIME_TO_FIRST_TOKEN = "gen_ai.latency.time_to_first_token"  # seconds
    REQUEST_ID = "tandem.request_id"
    ROUTE_ROLE = "tandem.route.role"  # which kind of worker a `route` span picked: prefill | decode
    ROUTE_ADDRESS = "tandem.route.address"  # host:port of the worker it picked
    # seconds spent turning tokens into text; the `detokenize` span itself spans first -> last token
    DETOKENIZE_BUSY_SECONDS = "tandem.detokenize.busy_seconds"
    KV_BYTES = "kv.bytes"
    KV_BLOCKS = "kv.blocks"  # blocks transferred
    # A decode worker that held the prompt's first blocks already (its prefix cache) reuses them:
    KV_REUSED_BLOCKS = "kv.reused_blocks"  # leading prompt blocks not transferred
    KV_CACHED_TOKENS = "kv.cached_tokens"  # their tokens (reused blocks x block size)
    KV_TRANSPORT = "kv.transport"  # e.g. "ucx", "fake"
    KV_GBPS = "kv.gbps"  # gigabits per second of the hand-off


def root_span_name(model: str) -> str:
    """Name of the frontend's per-request root span, e.g. `generate SmolLM2-135M-Instruct`."""
    return f"generate {model}"


def service_name_for(role_or_name: str) -> str:
    """`prefill` -> `tandem-prefill`; a name already starting with `tandem-` is kept."""
    if not role_or_name or any(c.isspace() for c in role_or_name):
        raise ValueError(f"service_name must be a non-empty word, got {role_or_name!r}")
    if role_or_name.startswith(SERVICE_NAME_PREFIX):
        return role_or_name
    return SERVICE_NAME_PREFIX + role_or_name


def resolve_endpoint(otlp_endpoint: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The explicit value (the `--otlp-traces-endpoint` flag) wins; else the standard env vars.

    An empty string anywhere means off. Returns None when tracing is off.
    """
    environ = os.environ if environ is None else environ
    if otlp_endpoint is not None:
        return otlp_endpoint.strip() or None
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    for key in ENV_ENDPOINTS:
        value = environ.get(key, "").strip()
        if value:
            return value
    return None


def _exporter_target(endpoint: str) -> tuple[str, bool]:
    """`http://host:4317` / `host:4317` -> insecure; `https://...` -> TLS. Returns (target, insecure)."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep:
        target, insecure = endpoint, True
    elif scheme in ("http", "https"):
        target, insecure = rest.rstrip("/"), scheme == "http"
    else:
        raise ValueError(f"otlp_endpoint: unsupported scheme {scheme!r} in {endpoint!r} (use http or https)")
    host, colon, port = target.rpartition(":")
    if not colon or not host or not port.isdigit():
        raise ValueError(f"otlp_endpoint: expected host:port, got {endpoint!r}")
    return target, insecure


def _untraced(call_details: Any) -> bool:
    method = getattr(call_details, "method", "") or ""
    if isinstance(method, bytes):
        method = method.decode()
    service_method = method.lstrip("/")
    return (service_method.startswith(UNTRACED_GRPC_SERVICE_PREFIXES)
            or service_method.rpartition("/")[2] in UNTRACED_GRPC_METHODS)


def _traced_filter(call_details: Any) -> bool:
    """Interceptor filter: True means trace this call."""
    return not _untraced(call_details)


@dataclasses.dataclass
class TracingHandle:
    """A service's tracer plus what it needs to instrument gRPC; see the module docstring."""

    service_name: str  # resource service.name, e.g. "tandem-decode"
    endpoint: str | None  # OTLP/gRPC collector, None when off
    tracer_provider: Any  # sdk TracerProvider when on, NoOpTracerProvider when off
    tracer: trace.Tracer

    @property
    def is_enabled(self) -> bool:
        return self.endpoint is not None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """For `grpc.aio.server(interceptors=...)` of the worker services; [] when off."""
        if not self.is_enabled:
            return []
        from opentelemetry.instrumentation.grpc import aio_server_interceptor

        return [aio_server_interceptor(tracer_provider=self.tracer_provider, filter_=_traced_filter)]

    def client_interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        """For `grpc.aio.insecure_channel(addr, interceptors=...)`; [] when off."""
        if not self.is_enabled:
            return []
        from opentelemetry.instrumentation.grpc import aio_client_interceptors

        return list(aio_client_interceptors(tracer_provider=self.tracer_provider, filter_=_traced_filter))

    @contextlib.contextmanager
    def start_span(
        self,
        name: str,
        parent: otel_context.Context | None = None,
        attributes: Mapping[str, Any] | None = None,
        kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    ) -> Iterator[trace.Span]:
        """A current span, child of `parent` (default: the current context). Exceptions mark it ERROR."""
        with self.tracer.start_as_current_span(
            name, context=parent, kind=kind, attributes=dict(attributes or {})
        ) as span:
            yield span

    def start_request_span(
        self, model: str, metadata: Iterable[tuple[str, str]] | Mapping[str, str] | None = None
    ) -> contextlib.AbstractContextManager[trace.Span]:
        """The frontend's root `generate {model}` SERVER span; joins a caller's traceparent if any."""
        parent = extract_context(metadata) if metadata is not None else None
        return self.start_span(
            root_span_name(model), parent=parent, attributes={Attr.REQUEST_MODEL: model},
            kind=trace.SpanKind.SERVER,
        )

    def record_span(
        self,
        name: str,
        start_ns: int,
        end_ns: int,
        parent: otel_context.Context | None = None,
        attributes: Mapping[str, Any] | None = None,
    ) -> None:
        """A finished span timed after the fact (queue waits, one batched forward per request)."""
        if end_ns < start_ns:
            raise ValueError(f"end_ns ({end_ns}) is before start_ns ({start_ns}) for span {name!r}")
        span = self.tracer.start_span(name, context=parent, attributes=dict(attributes or {}), start_time=start_ns)
        span.end(end_time=end_ns)

    def force_flush(self, timeout_millis: int = 5000) -> bool:
        """Sends every finished span now; True when all were exported (always True when off)."""
        if not self.is_enabled:
            return True
        return bool(self.tracer_provider.force_flush(timeout_millis))

    def shutdown(self) -> None:
        """Flushes and stops the exporter; call once when the service stops."""
        if self.is_enabled:
            self.tracer_provider.shutdown()


def init_tracing(service_name: str, otlp_endpoint: str | None = None) -> TracingHandle:
    """Sets up tracing for one service (`frontend`, `prefill`, `decode`, or any `tandem-*` name).

    `otlp_endpoint` is the `--otlp-traces-endpoint` value; None falls back to
    OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT. With none set tracing is off.
    The provider is the handle's own (not the global one), so several services can live in one
    process (tests, `tandem serve`) each with its own service.name.
    """
    name = service_name_for(service_name)
    endpoint = resolve_endpoint(otlp_endpoint)
    if endpoint is None:
        return TracingHandle(name, None, trace.NoOpTracerProvider(), trace.NoOpTracer())
    target, is_insecure = _exporter_target(endpoint)

    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create(
        {"service.name": name, "service.instance.id": f"{socket.gethostname()}:{os.getpid()}"}
    )
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=target, insecure=is_insecure)))
    return TracingHandle(name, endpoint, provider, provider.get_tracer("tandem"))


def current_context() -> otel_context.Context:
    """The active context, to hand to another thread (the engine loop) as `parent=`."""
    return otel_context.get_current()


def inject_context(ctx: otel_context.Context | None = None) -> dict[str, str]:
    """W3C trace context (`traceparent`, maybe `tracestate`) of `ctx` (default: current); {} if none."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier


def extract_context(carrier: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> otel_context.Context:
    """A parent context from `inject_context()`'s dict or gRPC metadata pairs (no trace -> empty)."""
    if carrier is None:
        return otel_context.Context()
    pairs = carrier.items() if isinstance(carrier, Mapping) else carrier
    as_dict = {}
    for key, value in pairs:
        if isinstance(value, bytes):
            continue  # binary metadata never carries traceparent
        as_dict[str(key).lower()] = str(value)
    return _PROPAGATOR.extract(as_dict, context=otel_context.Context())


def set_error(span: trace.Span, error: BaseException | str) -> None:
    """Marks `span` failed; exceptions are also recorded as span events."""
    if isinstance(error, BaseException):
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    else:
        span.set_status(Status(StatusCode.ERROR, str(error)))


def set_usage(
    span: trace.Span, num_input_tokens: int, num_output_tokens: int, finish_reasons: Sequence[str] = ()
) -> None:
    """GenAI usage attributes for a finished request."""
    if num_input_tokens < 0 or num_output_tokens < 0:
        raise ValueError(f"token counts must be >= 0, got input={num_input_tokens} output={num_output_tokens}")
    span.set_attribute(Attr.INPUT_TOKENS, num_input_tokens)
    span.set_attribute(Attr.OUTPUT_TOKENS, num_output_tokens)
    if finish_reasons:
        span.set_attribute(Attr.FINISH_REASONS, list(finish_reasons))


def kv_reuse_attributes(num_reused_blocks: int, num_cached_tokens: int) -> dict[str, int]:
    """kv.reused_blocks and kv.cached_tokens of a hand-off (for kv.recv, kv.send and decode.generate)."""
    if num_reused_blocks < 0 or num_cached_tokens < 0:
        raise ValueError(f"reused blocks and cached tokens must be >= 0, got {num_reused_blocks}, {num_cached_tokens}")
    return {Attr.KV_REUSED_BLOCKS: num_reused_blocks, Attr.KV_CACHED_TOKENS: num_cached_tokens}


def set_kv_transfer(span: trace.Span, num_bytes: int, num_blocks: int, transport: str, seconds: float) -> None:
    """KV hand-off attributes on a `kv.send` / `kv.recv` span; kv.gbps is gigabits per second."""
    if num_bytes < 0 or num_blocks < 0:
        raise ValueError(f"num_bytes and num_blocks must be >= 0, got {num_bytes}, {num_blocks}")
    if seconds < 0:
        raise ValueError(f"seconds must be >= 0, got {seconds}")
    span.set_attribute(Attr.KV_BYTES, num_bytes)
    span.set_attribute(Attr.KV_BLOCKS, num_blocks)
    span.set_attribute(Attr.KV_TRANSPORT, transport)
    if seconds > 0:
        span.set_attribute(Attr.KV_GBPS, num_bytes * 8 / seconds / 1e9)
