"""ServiceMetrics: values add up in the registry, and /metrics serves them over real HTTP."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common.metrics import (
    INTER_TOKEN_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    ServiceMetrics,
    start_metrics_server,
)

MODEL = "tiny-model"


def _sample(metrics: ServiceMetrics, name: str, **labels: str) -> float | None:
    """One sample's value from the registry, with model_name/role filled in."""
    labels = {"model_name": metrics.model_name, "role": metrics.role, **labels}
    return metrics.registry.get_sample_value(name, labels)


def test_counters_and_histograms_add_up():
    metrics = ServiceMetrics("frontend", MODEL)
    for seconds in (0.003, 0.05, 3.0):
        metrics.observe_time_to_first_token(seconds)
    metrics.observe_inter_token_latency(0.02)
    metrics.observe_inter_token_latency(0.03)
    metrics.add_tokens(num_prompt_tokens=7)
    metrics.add_tokens(num_prompt_tokens=5, num_generation_tokens=4)
    metrics.observe_request_finished("stop", e2e_seconds=1.2)
    metrics.observe_request_finished("stop", e2e_seconds=0.4)
    metrics.observe_request_finished("length", e2e_seconds=9.0)

    assert _sample(metrics, "tandem:time_to_first_token_seconds_count") == 3
    assert _sample(metrics, "tandem:time_to_first_token_seconds_sum") == pytest.approx(3.053)
    assert _sample(metrics, "tandem:time_to_first_token_seconds_bucket", le="0.005") == 1
    assert _sample(metrics, "tandem:time_to_first_token_seconds_bucket", le="0.06") == 2
    assert _sample(metrics, "tandem:time_to_first_token_seconds_bucket", le="2.5") == 2
    assert _sample(metrics, "tandem:inter_token_latency_seconds_sum") == pytest.approx(0.05)
    assert _sample(metrics, "tandem:prompt_tokens_total") == 12
    assert _sample(metrics, "tandem:generation_tokens_total") == 4
    assert _sample(metrics, "tandem:request_success_total", finished_reason="stop") == 2
    assert _sample(metrics, "tandem:request_success_total", finished_reason="length") == 1
    assert _sample(metrics, "tandem:request_success_total", finished_reason="abort") == 0
    assert _sample(metrics, "tandem:e2e_request_latency_seconds_count") == 3
    assert _sample(metrics, "tandem:e2e_request_latency_seconds_bucket", le="1.5") == 2


def test_gauges_and_kv_transfer():
    metrics = ServiceMetrics("decode", MODEL)
    metrics.set_queue_sizes(num_running=3, num_waiting=2)
    metrics.set_queue_sizes(num_running=1, num_waiting=0)
    metrics.set_kv_usage(num_used_blocks=25, num_total_blocks=100)
    metrics.observe_kv_transfer(num_bytes=1_000_000, seconds=0.002)
    metrics.observe_kv_transfer(num_bytes=500, seconds=0.0001)
    metrics.kv_transfer_failed()
    assert _sample(metrics, "tandem:num_requests_running") == 1
    assert _sample(metrics, "tandem:num_requests_waiting") == 0
    assert _sample(metrics, "tandem:kv_cache_usage_perc") == 0.25
    assert _sample(metrics, "tandem:kv_transfer_bytes_total") == 1_000_500
    assert _sample(metrics, "tandem:kv_transfer_seconds_count") == 2
    assert _sample(metrics, "tandem:kv_transfer_seconds_bucket", le="0.001") == 1
    assert _sample(metrics, "tandem:kv_transfer_failures_total") == 1


def test_prefix_cache_counters_follow_the_engine_totals():
    metrics = ServiceMetrics("prefill", MODEL)
    metrics.set_prefix_cache_totals(queries_tokens=64, hits_tokens=0)
    metrics.set_prefix_cache_totals(queries_tokens=64, hits_tokens=0)  # a refresh with nothing new
    metrics.set_prefix_cache_totals(queries_tokens=128, hits_tokens=48)
    assert _sample(metrics, "tandem:prefix_cache_queries_total") == 128
    assert _sample(metrics, "tandem:prefix_cache_hits_total") == 48
    with pytest.raises(ValueError, match="must grow"):
        metrics.set_prefix_cache_totals(queries_tokens=100, hits_tokens=48)


def test_registries_are_per_service():
    prefill = ServiceMetrics("prefill", MODEL)
    decode = ServiceMetrics("decode", MODEL)  # same metric names, no "Duplicated timeseries" error
    prefill.add_tokens(num_prompt_tokens=9)
    assert _sample(prefill, "tandem:prompt_tokens_total") == 9
    assert _sample(decode, "tandem:prompt_tokens_total") == 0


def test_vllm_bucket_boundaries():
    """Pinned to vLLM's so its dashboards and SLO rules carry over unchanged."""
    assert len(TTFT_BUCKETS) == 22 and TTFT_BUCKETS[0] == 0.001 and TTFT_BUCKETS[-1] == 2560.0
    assert len(INTER_TOKEN_BUCKETS) == 19 and INTER_TOKEN_BUCKETS[-1] == 80.0
    assert len(REQUEST_LATENCY_BUCKETS) == 21 and REQUEST_LATENCY_BUCKETS[-1] == 7680.0
    for buckets in (TTFT_BUCKETS, INTER_TOKEN_BUCKETS, REQUEST_LATENCY_BUCKETS):
        assert list(buckets) == sorted(set(buckets))


@pytest.mark.parametrize(
    "call, field",
    [
        (lambda m: m.observe_request_finished("done", 1.0), "finished_reason"),
        (lambda m: m.observe_time_to_first_token(-0.1), "seconds"),
        (lambda m: m.add_tokens(num_prompt_tokens=-1), "num_prompt_tokens"),
        (lambda m: m.set_kv_usage(num_used_blocks=5, num_total_blocks=4), "num_used_blocks"),
        (lambda m: m.set_kv_usage(num_used_blocks=0, num_total_blocks=0), "num_total_blocks"),
        (lambda m: m.set_queue_sizes(num_running=-1, num_waiting=0), "num_running"),
    ],
)
def test_bad_values_name_the_field(call, field):
    with pytest.raises(ValueError, match=field):
        call(ServiceMetrics("prefill", MODEL))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="role"):
        ServiceMetrics("router", MODEL)
    with pytest.raises(ValueError, match="model_name"):
        ServiceMetrics("decode", "")
    with pytest.raises(ValueError, match="port"):
        start_metrics_server(70000, ServiceMetrics("decode", MODEL).registry)


def test_metrics_endpoint_serves_over_http():
    metrics = ServiceMetrics("prefill", MODEL)
    metrics.add_tokens(num_prompt_tokens=17)
    metrics.observe_request_finished("abort", e2e_seconds=0.7)
    server = start_metrics_server(0, metrics.registry, host="127.0.0.1")
    try:
        assert server.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain")
            body = response.read().decode()
    finally:
        server.close()
    samples = {
        (sample.name, sample.labels.get("finished_reason")): sample
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }
    prompt = samples[("tandem:prompt_tokens_total", None)]
    assert prompt.value == 17
    assert prompt.labels == {"model_name": MODEL, "role": "prefill"}
    assert samples[("tandem:request_success_total", "abort")].value == 1
    assert samples[("tandem:e2e_request_latency_seconds_count", None)].value == 1
    for name in ("tandem:num_requests_running", "tandem:num_requests_waiting", "tandem:kv_cache_usage_perc",
                 "tandem:kv_transfer_failures_total", "tandem:generation_tokens_total"):
        assert (name, None) in samples, name
    # Closed means closed: the port no longer answers.
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=2)
