"""Prometheus metrics for Tandem services: vLLM's metric names under a `tandem:` prefix.

Each service owns one `ServiceMetrics` (its own CollectorRegistry, so several services or tests in
one process never collide) and serves it on a port of its own:

    metrics = ServiceMetrics(role="decode", model_name="SmolLM2-135M-Instruct")
    server = start_metrics_server(args.metrics_port, metrics.registry)   # GET /metrics
    metrics.observe_time_to_first_token(0.042)
    metrics.add_tokens(num_generation_tokens=8)                           # as tokens are produced
    metrics.observe_request_finished("stop", e2e_seconds=1.3)
    server.close()

Every series carries `model_name` and `role` (frontend / prefill / decode). Who records what:
- frontend: time_to_first_token, inter_token_latency, e2e_request_latency, request_success
  (what the client saw), num_requests_running (open streams).
- prefill: prompt_tokens, time_to_first_token (arrival -> token #1), request_success and
  e2e_request_latency for the requests that end there, num_requests_waiting/running, kv_cache_usage,
  kv_transfer_* (send side).
- decode: generation_tokens, time_to_first_token (Decode call's arrival -> its first streamed token),
  inter_token_latency, request_success and e2e_request_latency (arrival -> end),
  num_requests_waiting/running, kv_cache_usage, kv_transfer_* (recv side).
- prefill and decode: prefix_cache_queries / prefix_cache_hits (vLLM's names), in tokens. On a prefill
  worker a hit is a prompt token not computed; on a decode worker, a handed-off prompt token whose KV
  it already held (its block was reused, not transferred).
docs/observability.md says exactly what each worker measures.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

PREFIX = "tandem:"
# prometheus_client's own variable: where each process of a multiprocess group writes its metrics. It is
# read once, when prometheus_client is imported, so it must be in a process's environment from its start.
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
ROLES = ("frontend", "prefill", "decode", "worker")  # worker: a colocated `tandem worker`
# vLLM's FinishReason values (request_success_total{finished_reason}).
FINISHED_REASONS = ("stop", "length", "abort", "error")

# Bucket boundaries copied from vLLM's Prometheus logger so dashboards carry over.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
INTER_TOKEN_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
)
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
)
# Tandem's own: a KV hand-off takes ~100 us (same host, CUDA IPC) to seconds (TCP, long prompts).
KV_TRANSFER_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0,
)

_LABELS = ("model_name", "role")


def _check_non_negative(**values: float) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


class ServiceMetrics:
    """All metrics of one service, bound to its model_name and role."""

    def __init__(self, role: str, model_name: str, registry: CollectorRegistry | None = None):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not model_name:
            raise ValueError("model_name must be non-empty")
        self.role, self.model_name = role, model_name
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name, "role": role}

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, _LABELS, buckets=buckets, registry=self.registry)

        def gauge(name: str, doc: str, multiprocess_mode: str) -> Gauge:
            return Gauge(PREFIX + name, doc, _LABELS, registry=self.registry, multiprocess_mode=multiprocess_mode)

        def counter(name: str, doc: str, extra_labels: tuple[str, ...] = ()) -> Counter:
            return Counter(PREFIX + name, doc, _LABELS + extra_labels, registry=self.registry)

        self._ttft = histogram("time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS)
        self._itl = histogram("inter_token_latency_seconds", "Inter-token latency in seconds.", INTER_TOKEN_BUCKETS)
        self._e2e = histogram(
            "e2e_request_latency_seconds", "End-to-end request latency in seconds.", REQUEST_LATENCY_BUCKETS
        )
        self._kv_seconds = histogram("kv_transfer_seconds", "KV hand-off duration in seconds.", KV_TRANSFER_BUCKETS)
        # Merged over the live processes when several share a PROMETHEUS_MULTIPROC_DIR (`merged_registry`).
        self._running = gauge("num_requests_running", "Requests being computed now.", "livesum")
        self._waiting = gauge("num_requests_waiting", "Requests queued, not yet computed.", "livesum")
        self._kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0 to 1).", "livemax")
        self._prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self._generation_tokens = counter("generation_tokens", "Tokens generated.")
        self._success = counter("request_success", "Finished requests by finish reason.", ("finished_reason",))
        self._kv_bytes = counter("kv_transfer_bytes", "KV bytes handed off.")
        self._kv_failures = counter("kv_transfer_failures", "KV hand-offs that failed.")
        self._prefix_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache "
                                       "(decode workers: prompts handed off to them).")
        self._prefix_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache (decode "
                                    "workers: KV reused, not transferred).")
        self._prefix_totals = (0, 0)  # the engine's running totals at the last update (queries, hits)
        # Bind the constant labels once; every method below then costs one child lookup less.
        self._bound = {
            metric: metric.labels(**labels)
            for metric in (self._ttft, self._itl, self._e2e, self._kv_seconds, self._running, self._waiting,
                           self._kv_usage, self._prompt_tokens, self._generation_tokens, self._kv_bytes,
                           self._kv_failures, self._prefix_queries, self._prefix_hits)
        }
        self._success_by_reason = {r: self._success.labels(finished_reason=r, **labels) for r in FINISHED_REASONS}

    def observe_time_to_first_token(self, seconds: float) -> None:
        _check_non_negative(seconds=seconds)
        self._bound[self._ttft].observe(seconds)

    def observe_inter_token_latency(self, seconds: float) -> None:
        """One gap between two consecutive output tokens of a request."""
        _check_non_negative(seconds=seconds)
        self._bound[self._itl].observe(seconds)

    def observe_inter_token_latencies(self, seconds: Sequence[float]) -> None:
        """Many gaps at once (one decode step's, one per request that got a token): a float each, no checks per item."""
        if not seconds:
            return
        _check_non_negative(seconds=min(seconds))
        observe = self._bound[self._itl].observe
        for value in seconds:
            observe(value)

    def add_tokens(self, num_prompt_tokens: int = 0, num_generation_tokens: int = 0) -> None:
        """Counts tokens when they are computed (so aborted requests count too, as in vLLM)."""
        _check_non_negative(num_prompt_tokens=num_prompt_tokens, num_generation_tokens=num_generation_tokens)
        if num_prompt_tokens:
            self._bound[self._prompt_tokens].inc(num_prompt_tokens)
        if num_generation_tokens:
            self._bound[self._generation_tokens].inc(num_generation_tokens)

    def observe_request_finished(self, finished_reason: str, e2e_seconds: float) -> None:
        """A request ended: stop (EOS/stop string), length (max_tokens), abort (cancel) or error."""
        if finished_reason not in self._success_by_reason:
            raise ValueError(f"finished_reason must be one of {FINISHED_REASONS}, got {finished_reason!r}")
        _check_non_negative(e2e_seconds=e2e_seconds)
        self._success_by_reason[finished_reason].inc()
        self._bound[self._e2e].observe(e2e_seconds)

    def set_queue_sizes(self, num_running: int, num_waiting: int) -> None:
        _check_non_negative(num_running=num_running, num_waiting=num_waiting)
        self._bound[self._running].set(num_running)
        self._bound[self._waiting].set(num_waiting)

    def set_kv_usage(self, num_used_blocks: int, num_total_blocks: int) -> None:
        """kv_cache_usage_perc = used / total (a fraction, like vLLM's)."""
        if num_total_blocks <= 0:
            raise ValueError(f"num_total_blocks must be > 0, got {num_total_blocks}")
        if not 0 <= num_used_blocks <= num_total_blocks:
            raise ValueError(f"num_used_blocks must be in 0..{num_total_blocks}, got {num_used_blocks}")
        self._bound[self._kv_usage].set(num_used_blocks / num_total_blocks)

    def observe_kv_transfer(self, num_bytes: int, seconds: float) -> None:
        """A KV hand-off that completed."""
        _check_non_negative(num_bytes=num_bytes, seconds=seconds)
        self._bound[self._kv_bytes].inc(num_bytes)
        self._bound[self._kv_seconds].observe(seconds)

    def kv_transfer_failed(self) -> None:
        self._bound[self._kv_failures].inc()

    def set_prefix_cache_totals(self, queries_tokens: int, hits_tokens: int) -> None:
        """The engine's running totals of prefix-cache lookups and hits, in tokens (vLLM's
        prefix_cache_queries / prefix_cache_hits); the counters advance by what is new since the last call."""
        last_queries, last_hits = self._prefix_totals
        if queries_tokens < last_queries or hits_tokens < last_hits or hits_tokens > queries_tokens:
            raise ValueError(f"prefix cache totals must grow and hits stay <= queries: got {queries_tokens}, "
                             f"{hits_tokens} after {last_queries}, {last_hits}")
        if queries_tokens > last_queries:
            self._bound[self._prefix_queries].inc(queries_tokens - last_queries)
        if hits_tokens > last_hits:
            self._bound[self._prefix_hits].inc(hits_tokens - last_hits)
        self._prefix_totals = (queries_tokens, hits_tokens)


def exposition_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """What /metrics serves: `registry`; or, in a process among several that share a prometheus_client
    multiprocess directory (PROMETHEUS_MULTIPROC_DIR, set by `tandem frontend --api-server-count N` for
    its API servers), every process's metrics merged: counters and histograms summed, the gauges as
    each one's multiprocess mode says."""
    directory = os.environ.get(MULTIPROCESS_DIR_VARIABLE)
    return merged_registry(directory) if directory else registry


def merged_registry(directory: str) -> CollectorRegistry:
    """A registry that reads, at each scrape, the metrics every process wrote under `directory`."""
    merged = CollectorRegistry()
    MultiProcessCollector(merged, path=directory)
    return merged


@dataclasses.dataclass
class MetricsServer:
    """A running /metrics HTTP server; `port` is the bound one (useful after asking for port 0)."""

    port: int
    _server: WSGIServer
    _thread: threading.Thread

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def start_metrics_server(port: int, registry: CollectorRegistry, host: str = "0.0.0.0") -> MetricsServer:
    """Serves `registry` in Prometheus text format at http://host:port/metrics on a daemon thread."""
    if not 0 <= port <= 65535:
        raise ValueError(f"metrics port must be in 0..65535, got {port}")
    server, thread = prometheus_client.start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server.server_port, server, thread)
