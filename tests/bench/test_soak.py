"""bench/soak.py: a few seconds of the mixed load through a real `tandem serve` (a check of the report,
not of its figures): every sample has each process's RSS and each worker's KV usage, requests of every
kind completed without errors, the trend has a slope per process, and the pools are free afterwards."""

import math

import pytest

from bench.soak import KINDS
from tests.bench.bench_helpers import run_bench

pytestmark = pytest.mark.slow


def test_short_soak_reports_samples_and_trend(tmp_path):
    result, lines = run_bench("soak.py", ["--duration", "12", "--sample-seconds", "4", "--concurrency",
                                          str(len(KINDS)), "--think-seconds", "0.1", "--max-tokens", "6",
                                          "--engine-args", "--kv-cache-memory 64MiB --max-model-len 512"],
                              tmp_path, timeout=600)
    samples = result["samples"]
    assert len(samples) >= 3 and samples[0]["seconds"] < samples[-1]["seconds"]
    for sample in samples:
        assert set(sample["rss_mib"]) == {"frontend", "prefill-0", "decode-0"}
        assert all(rss is not None and rss > 10 for rss in sample["rss_mib"].values()), sample
        assert set(sample["workers"]) == {"prefill-0", "decode-0"}
        for stats in sample["workers"].values():
            assert 0.0 <= stats["kv_cache_usage"] <= 1.0 and stats["num_total_blocks"] > 0
    assert sum(s["num_completed"] for s in samples) > 0 and sum(s["num_cancelled"] for s in samples) > 0
    assert sum(s["num_errors"] for s in samples) == 0, [s["errors"] for s in samples]
    assert any(s["latency_ms_p50"] is not None and s["latency_ms_p50"] <= s["latency_ms_p99"] for s in samples)
    assert result["num_sent"] >= sum(s["num_completed"] + s["num_cancelled"] for s in samples)

    trend = result["trend"]
    assert set(trend["rss_mib_per_hour"]) == {"frontend", "prefill-0", "decode-0"}
    assert all(math.isfinite(v) for v in trend["rss_mib_per_hour"].values())
    assert all(math.isfinite(v) for v in trend["kv_usage_per_hour"].values())
    assert trend["first_window_p99_ms"] > 0 and trend["last_window_p99_ms"] > 0
    assert result["idle_after"]["is_idle"], result["idle_after"]
    assert any(line.startswith("after the load: every pool free") for line in lines)
