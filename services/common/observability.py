"""Tracing and metrics of one service, set up once in its `main` (see docs/observability.md).

    handle = tracing.init_tracing("decode", args.otlp_traces_endpoint)   # before the server starts
    server = await start_server(..., interceptors=handle.server_interceptors())   # [] when off
    obs = Observability.start(handle, "decode", engine.model_name, args.metrics_port)  # model loaded
    obs.metrics.add_tokens(...)          # always recorded; served on /metrics only with --metrics-port
    obs.close()

Tracing off (no endpoint in flags or environment) costs nothing: a no-op tracer, no interceptors.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

from opentelemetry import trace

from common import tracing
from common.metrics import MetricsServer, ServiceMetrics, start_metrics_server
from common.tracing import Attr


def add_observability_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--otlp-traces-endpoint", default=os.environ.get("TANDEM_OTLP_TRACES_ENDPOINT"),
                        help="OTLP/gRPC collector, e.g. http://localhost:4317 (default: $OTEL_EXPORTER_OTLP_ENDPOINT; "
                             "unset = tracing off)")
    parser.add_argument("--metrics-port", type=int, default=int(os.environ.get("TANDEM_METRICS_PORT", "-1")),
                        help="serve Prometheus /metrics on this port (0 = any free port, -1 = off, the default)")


@dataclass
class Observability:
    tracing: tracing.TracingHandle
    metrics: ServiceMetrics
    metrics_server: MetricsServer | None = None

    @classmethod
    def start(cls, tracing_handle: tracing.TracingHandle, role: str, model_name: str,
              metrics_port: int = -1, metrics_host: str = "0.0.0.0") -> "Observability":
        """Metrics for a loaded model (its name labels every series); tracing was set up at start-up.
        /metrics is served on `metrics_host:metrics_port` (the service's own bind address)."""
        if not -1 <= metrics_port <= 65535:
            raise ValueError(f"metrics_port: must be in [-1, 65535], got {metrics_port}")
        metrics = ServiceMetrics(role=role, model_name=model_name)
        server = start_metrics_server(metrics_port, metrics.registry, metrics_host) if metrics_port >= 0 else None
        return cls(tracing_handle, metrics, server)

    @classmethod
    def disabled(cls, role: str, model_name: str) -> "Observability":
        """In-process use (tests): metrics recorded but not served, no tracing."""
        return cls(tracing.init_tracing(role, ""), ServiceMetrics(role=role, model_name=model_name))

    def close(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
        self.tracing.shutdown()

    def start_detached_span(self, name: str, parent, attributes: dict | None = None) -> trace.Span:
        """A span that lives across engine-loop iterations (ended by the caller), not made current."""
        return self.tracing.tracer.start_span(name, context=parent, attributes=attributes or {})


def kv_transfer_attributes(num_bytes: int, num_blocks: int, transport: str, seconds: float) -> dict:
    """kv.* span attributes (kv.gbps in gigabits per second)."""
    attributes = {Attr.KV_BYTES: num_bytes, Attr.KV_BLOCKS: num_blocks, Attr.KV_TRANSPORT: transport}
    if seconds > 0:
        attributes[Attr.KV_GBPS] = num_bytes * 8 / seconds / 1e9
    return attributes
