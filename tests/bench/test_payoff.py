"""bench/payoff.py: the burst workload and its arrivals, SLO figures and goodput, and a CPU run of every
topology through real processes, split over two commands merged with --previous, whose JSON must add up."""

import pytest

from bench._common import poisson_arrivals
from bench._disagg_client import RequestRecord
from bench._disagg_report import client_figures
from bench._payoff_figures import burst_offsets, burst_workload, slo_figures, summarize
from bench.sharegpt import sharegpt_workload
from tests.bench.bench_helpers import run_bench

NUM_REQUESTS, MAX_INPUT_LEN, MAX_OUTPUT_LEN, BURST_LEN, VOCAB_SIZE = 5, 40, 6, 64, 49152
RATES = (2.0, 4.0)


def test_bursts_give_a_seeded_30_percent_long_prompts_that_arrive_together():
    prompts, output_lens = sharegpt_workload(20, VOCAB_SIZE, 100, 10)
    long_prompts, long_lens, long_indices = burst_workload(prompts, output_lens, VOCAB_SIZE, 0.3, 500, seed=0)
    assert len(long_indices) == 6 and long_lens == output_lens
    assert [len(p) for p in long_prompts] == [500 if i in long_indices else len(p) for i, p in enumerate(prompts)]
    assert [p for i, p in enumerate(long_prompts) if i not in long_indices] == [
        p for i, p in enumerate(prompts) if i not in long_indices]
    assert burst_workload(prompts, output_lens, VOCAB_SIZE, 0.3, 500, seed=0)[2] == long_indices
    offsets = burst_offsets(20, 4.0, 0, long_indices, burst_size=4)
    plain = poisson_arrivals(20, 4.0, 0)
    groups = [long_indices[:4], long_indices[4:]]
    for group in groups:  # each group leaves at its first member's arrival
        assert {offsets[i] for i in group} == {plain[group[0]]}
    assert all(offsets[i] == plain[i] for i in range(20) if i not in long_indices)


def _record(ttft: float, gaps: list[float]) -> RequestRecord:
    record = RequestRecord("r", 4, len(gaps) + 1, sent=0.0)
    now = ttft
    record.add_chunk(now, 1)
    for gap in gaps:
        now += gap
        record.add_chunk(now, 1)
    record.end = now
    return record


def test_slo_figures_take_the_run_p99_and_each_requests_own():
    fast, slow_start, stuttering = _record(0.2, [0.02] * 9), _record(1.5, [0.02] * 9), _record(0.2, [0.02] * 8 + [0.3])
    records = [fast, slow_start, stuttering]
    figures = client_figures(records, wall_seconds=2.0)
    slo = slo_figures(records, figures, ttft_slo_s=1.0, itl_slo_ms=50.0)
    assert slo["slo_attainment"] == pytest.approx(1 / 3) and not slo["meets_slo"]
    only_fast = client_figures([fast], wall_seconds=1.0)
    assert slo_figures([fast], only_fast, 1.0, 50.0) == {"meets_slo": True, "slo_attainment": 1.0,
                                                         "requests_per_s": 1.0}


def test_goodput_is_the_highest_rate_meeting_the_slo_and_burst_itl_is_over_the_same_rate_without():
    def run(rate, meets, itl_p99, num_gpus=2):
        return {"rate": rate, "meets_slo": meets, "itl_ms": {"p99": itl_p99}, "output_tokens_per_s": 10 * rate,
                "num_gpus": num_gpus}

    report = {"runs": {"a/sharegpt/rate-2": run(2.0, True, 20.0), "a/sharegpt/rate-4": run(4.0, True, 30.0),
                       "a/sharegpt/rate-8": run(8.0, False, 90.0), "a/bursts/rate-2": run(2.0, True, 30.0),
                       "a/bursts/rate-4": run(4.0, False, 60.0)}}
    summary = summarize(report)["a"]
    assert summary["workloads"]["sharegpt"] == {"goodput_rps": 4.0, "max_output_tokens_per_s": 80.0,
                                                "goodput_rps_per_gpu": 2.0}
    assert summary["workloads"]["bursts"]["goodput_rps"] == 2.0
    assert summary["burst_itl_ratio"] == {"2": 1.5, "4": 2.0}


def _check_run(run: dict, prompts: list[list[int]], output_lens: list[int], topology: str, threshold: int) -> None:
    assert [(r["prompt_tokens"], r["num_tokens"], r["error"]) for r in run["requests"]] == [
        (len(p), n, None) for p, n in zip(prompts, output_lens)]
    assert (run["num_completed"], run["num_errors"], run["truncated"]) == (len(prompts), 0, False)
    assert run["requests_per_s"] == pytest.approx(len(prompts) / run["wall_seconds"])
    assert 0 <= run["slo_attainment"] <= 1
    assert run["meets_slo"] == (run["ttft_ms"]["p99"] <= 1000.0 and run["itl_ms"]["p99"] <= 50.0)
    num_long = sum(len(p) > threshold for p in prompts)
    if topology == "1p1d":
        assert run["num_hand_offs"] == len(prompts)
    elif topology == "1p1d-local":  # every prompt over the threshold is handed off; some others go local
        assert num_long <= run["num_hand_offs"] < len(prompts)
    else:
        assert run["num_hand_offs"] == 0


@pytest.mark.slow
def test_cpu_runs_of_every_topology_merge_into_one_consistent_report(tmp_path):
    common = ["--device", "cpu", "--model", "dummy:tiny", "--num-requests", str(NUM_REQUESTS),
              "--max-input-len", str(MAX_INPUT_LEN), "--max-output-len", str(MAX_OUTPUT_LEN),
              "--burst-prompt-len", str(BURST_LEN), "--burst-size", "2", "--rates", ",".join(map(str, RATES)),
              "--max-local-prefill-length", str(MAX_INPUT_LEN), "--warmup-requests", "1", "--client-processes", "1"]
    first, _ = run_bench("payoff.py", [*common, "--topologies", "1p1d,1colocated", "--single-gpu-check",
                                       "--log-dir", str(tmp_path / "a")], tmp_path, timeout=400)
    assert first["failure"] is None and first["topologies_done"] == ["1p1d", "1colocated"]
    single_gpu = first["single_gpu"]  # one colocated worker against the engine alone on the same requests
    assert single_gpu["engine"]["output_tokens_per_s"] > 0 and not single_gpu["engine"]["truncated"]
    assert single_gpu["saturation"]["num_errors"] == single_gpu["load_80"]["num_errors"] == 0
    assert single_gpu["load_80"]["rate"] == pytest.approx(0.8 * single_gpu["saturation"]["requests_per_s"])
    assert single_gpu["throughput_vs_engine"] == pytest.approx(
        single_gpu["saturation"]["output_tokens_per_s"] / single_gpu["engine"]["output_tokens_per_s"])
    previous = tmp_path / "first.json"
    previous.write_text((tmp_path / "payoff.json").read_text())
    result, stdout = run_bench("payoff.py", [*common, "--topologies", "1p1d-local,2colocated", "--previous",
                                             str(previous), "--log-dir", str(tmp_path / "b")], tmp_path, timeout=400)
    assert result["failure"] is None and result["skipped"] == []
    assert result["single_gpu"] == single_gpu  # kept from --previous
    assert sorted(result["topologies_done"]) == ["1colocated", "1p1d", "1p1d-local", "2colocated"]
    prompts, output_lens = sharegpt_workload(NUM_REQUESTS, VOCAB_SIZE, MAX_INPUT_LEN, MAX_OUTPUT_LEN)
    long_prompts, _, long_indices = burst_workload(prompts, output_lens, VOCAB_SIZE, 0.3, BURST_LEN)
    assert result["workloads"]["bursts"]["num_long"] == len(long_indices) == 2
    workloads = {"sharegpt": prompts, "bursts": long_prompts}
    assert len(result["runs"]) == 4 * 2 * len(RATES)
    for key, run in result["runs"].items():
        topology, workload, rate = key.split("/")
        assert rate == f"rate-{run['rate']:g}"
        _check_run(run, workloads[workload], output_lens, topology, MAX_INPUT_LEN)
    for topology, entry in result["summary"].items():
        for workload, group in entry["workloads"].items():
            met = [run["rate"] for key, run in result["runs"].items()
                   if key.startswith(f"{topology}/{workload}/") and run["meets_slo"]]
            assert group["goodput_rps"] == max(met, default=0.0)
        for rate in RATES:
            bursts, calm = (result["runs"][f"{topology}/{w}/rate-{rate:g}"] for w in ("bursts", "sharegpt"))
            assert entry["burst_itl_ratio"][f"{rate:g}"] == pytest.approx(bursts["itl_ms"]["p99"] / calm["itl_ms"]["p99"])
    assert stdout[-1].split()[:3] == ["1colocated", "1", "bursts"]  # the table comes last, every topology in it
    assert {line.split()[0] for line in stdout[-8:]} == {"1p1d", "1p1d-local", "2colocated", "1colocated"}
