"""bench/disagg.py: the served model folder, arrivals, the client's figures, and CPU runs of every phase
through real prefill, decode and frontend processes (tiny model, the embedded tokenizer's vocabulary),
from one client process and from two."""

import json
import math
import os
import subprocess
import sys

import pytest

from bench._common import poisson_arrivals
from bench._disagg_client import RequestRecord
from bench import _disagg_services
from bench._disagg_report import client_figures
from bench._disagg_services import hf_config, write_synthetic_tokenizer
from bench.disagg import default_client_processes
from bench.sharegpt import sharegpt_workload
from common.model.config import PRESETS, ModelConfig
from tests.bench.bench_helpers import REPO, run_bench

NUM_REQUESTS, MAX_INPUT_LEN, MAX_OUTPUT_LEN, VOCAB_SIZE = 6, 64, 12, 49152
RUNS = ("grpc-inf", "http-inf", "grpc-rate-4")
RUN_FIELDS = {
    "name", "api", "rate", "num_requests", "num_completed", "output_tokens", "asked_tokens", "wall_seconds",
    "output_tokens_per_s", "ratio_to_engine", "ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "num_errors",
    "error_messages", "truncated", "kv", "compiles", "compiles_total", "compiles_after_ready",
    "bench_process_cpu_fraction", "worker_stats", "requests", "gap_1_to_2_ms", "client_cpu_fractions",
    "num_client_processes", "client_event_loop", "parent_process_cpu_fraction", "service_cpu_fractions",
}
KV_FIELDS = {"num_sends", "num_recvs", "send_ms", "recv_ms", "gb_per_s", "recv_gb_per_s", "bytes", "total_bytes",
             "transports", "ttft_share", "num_failed_spans"}


def test_a_frontends_cpu_time_counts_its_api_server_processes(monkeypatch, tmp_path):
    seconds_by_pid = {10: 0.5, 11: 2.0, 12: 3.0, 20: 1.5}
    monkeypatch.setattr(_disagg_services, "process_cpu_seconds", seconds_by_pid.get)
    services = _disagg_services.Services(tmp_path, "")

    def started(name: str, pid: int, info: dict) -> None:
        popen = type("Popen", (), {"pid": pid})()
        services.started.append(_disagg_services.Service(name, name, None, popen, tmp_path / "log", tmp_path / "ready",
                                                         info))

    started("frontend", 10, {"port": 1, "api_server_pids": [11, 12]})
    started("decode", 20, {"port": 2})
    assert services.cpu_seconds() == {"frontend": 5.5, "decode": 1.5}
    seconds_by_pid[12] = None  # an API server gone: no figure rather than a short one
    assert services.cpu_seconds() == {"frontend": None, "decode": 1.5}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_folder_config_reads_back_as_the_preset(name):
    preset = PRESETS[name]
    assert ModelConfig.from_hf_config(hf_config(preset, preset.vocab_size)) == preset


def test_a_smaller_vocabulary_moves_special_ids_inside_it():
    config = ModelConfig.from_hf_config(hf_config(PRESETS["llama-3-8b"], VOCAB_SIZE))
    assert (config.vocab_size, config.bos_token_id, config.eos_token_ids) == (VOCAB_SIZE, 1, (2,))
    assert config.hidden_size == 4096 and config.rope_scaling == PRESETS["llama-3-8b"].rope_scaling


def test_synthetic_tokenizer_has_exactly_the_vocabulary(tmp_path):
    from common.tokenizer import load_tokenizer

    write_synthetic_tokenizer(tmp_path, 1000)
    tokenizer = load_tokenizer(tmp_path)
    assert len(tokenizer) == 1000
    assert tokenizer.decode([5, 999]) == "t5 t999"


def test_poisson_arrivals_are_seeded_with_the_asked_mean_gap():
    offsets = poisson_arrivals(4000, 8.0, seed=3)
    assert offsets == poisson_arrivals(4000, 8.0, seed=3) and offsets != poisson_arrivals(4000, 8.0, seed=4)
    assert all(b >= a for a, b in zip(offsets, offsets[1:]))
    assert abs(offsets[-1] / len(offsets) - 1 / 8.0) < 0.01
    assert poisson_arrivals(3, float("inf")) == [0.0, 0.0, 0.0]


def test_client_processes_default_to_a_quarter_of_the_cores_from_1_to_8(monkeypatch):
    for num_cpus, expected in ((None, 1), (2, 1), (7, 1), (8, 2), (32, 8), (128, 8)):
        monkeypatch.setattr(os, "cpu_count", lambda: num_cpus)
        assert default_client_processes() == expected, num_cpus


def _record(sent: float, chunks: list[tuple[float, int]]) -> RequestRecord:
    record = RequestRecord("r", 5, sum(n for _, n in chunks), sent=sent, end=chunks[-1][0])
    for now, num_tokens in chunks:
        record.add_chunk(now, num_tokens)
    return record


def test_gap_1_to_2_is_token_1_to_token_2_and_0_when_one_chunk_brings_both():
    records = [
        _record(10.0, [(10.5, 1), (10.8, 1), (11.0, 1)]),  # TTFT 0.5 s, token #2 0.3 s later
        _record(20.0, [(20.2, 2), (20.4, 1)]),  # tokens #1 and #2 in one chunk: gap 0
        _record(30.0, [(30.1, 1)]),  # one token: no gap 1 -> 2
    ]
    figures = client_figures(records, wall_seconds=2.0)
    assert figures["gap_1_to_2_ms"] == pytest.approx({"p50": 150.0, "p99": 297.0})
    assert figures["ttft_ms"]["p50"] == pytest.approx(200.0) and figures["output_tokens"] == 7
    summary = records[0].summary(start_at=9.0)
    assert summary["second_token_s"] - summary["ttft_s"] == pytest.approx(0.3)
    assert summary["sent_s"] == pytest.approx(1.0)


def _kv_bytes(num_prompt_tokens: int) -> int:
    """Whole 16-token blocks x K and V x 2 layers x 2 KV heads x head_dim 32 x fp32 ("tiny" preset)."""
    return math.ceil(num_prompt_tokens / 16) * 16 * 2 * 2 * 2 * 32 * 4


def _check_service_run(run: dict, name: str, prompts: list[list[int]], output_lens: list[int]) -> None:
    """Every request once, in order, with exactly its tokens; one hand-off each; sane figures."""
    num_requests = len(prompts)
    assert set(run) == RUN_FIELDS and set(run["kv"]) == KV_FIELDS, name
    assert [(r["prompt_tokens"], r["num_tokens"], r["usage_tokens"], r["error"]) for r in run["requests"]] == [
        (len(p), n, n, None) for p, n in zip(prompts, output_lens)], name
    request_ids = [r["request_id"] for r in run["requests"]]
    assert len(set(request_ids)) == num_requests, name
    if run["api"] == "grpc":
        assert request_ids == [f"{name}-{i}" for i in range(num_requests)]
    assert (run["num_completed"], run["num_errors"], run["truncated"]) == (num_requests, 0, False)
    assert run["output_tokens"] == run["asked_tokens"] == sum(output_lens)
    assert run["output_tokens_per_s"] == run["output_tokens"] / run["wall_seconds"]
    for key in ("ttft_ms", "itl_ms", "tpot_ms"):
        assert 0 < run[key]["p50"] <= run[key]["p99"], (name, key)
    assert 0 <= run["gap_1_to_2_ms"]["p50"] <= run["gap_1_to_2_ms"]["p99"]
    assert len(run["client_cpu_fractions"]) == run["num_client_processes"]
    assert run["bench_process_cpu_fraction"] == max(run["client_cpu_fractions"]) > 0
    assert run["client_event_loop"] in ("uvloop", "asyncio")
    assert set(run["service_cpu_fractions"]) == {"prefill-0", "decode-0", "frontend"}
    assert all(fraction > 0 for fraction in run["service_cpu_fractions"].values())  # each did work in the run
    kv = run["kv"]  # one hand-off per request
    assert kv["num_sends"] == kv["num_recvs"] == num_requests and kv["num_failed_spans"] == 0
    whole_prompts = sum(_kv_bytes(len(p)) for p in prompts)
    if name == "grpc-inf":  # the first run of these prompts: every hand-off moves its prompt's whole blocks
        assert kv["total_bytes"] == whole_prompts
    else:  # the same prompts again: the decode worker still holds their full blocks and pulls only the rest
        assert 0 < kv["total_bytes"] < whole_prompts
    assert sum(kv["transports"]["send"].values()) == num_requests
    assert "None" not in kv["transports"]["send"] and "fake" not in kv["transports"]["send"]
    assert 0 < kv["send_ms"]["p50"] and 0 < kv["gb_per_s"]["p50"] and 0 < kv["ttft_share"]["p50"] < 1
    assert 0 < kv["recv_ms"]["p50"] and 0 < kv["recv_gb_per_s"]["p50"]
    assert set(run["compiles"]) == {"prefill-0", "decode-0"}
    assert all(v is None or v >= 0 for v in run["compiles"].values())


@pytest.mark.slow
def test_cpu_run_measures_every_phase_through_real_services(tmp_path):
    result, stdout = run_bench("disagg.py", [
        "--device", "cpu", "--model", "dummy:tiny", "--num-requests", str(NUM_REQUESTS),
        "--max-input-len", str(MAX_INPUT_LEN), "--max-output-len", str(MAX_OUTPUT_LEN), "--rates", "4",
        "--requests-per-rate", str(NUM_REQUESTS), "--warmup-requests", "2", "--log-dir", str(tmp_path / "logs"),
    ], tmp_path, timeout=240)
    prompts, output_lens = sharegpt_workload(NUM_REQUESTS, VOCAB_SIZE, MAX_INPUT_LEN, MAX_OUTPUT_LEN)
    assert result["failure"] is None and result["skipped"] == []
    assert result["phases_done"] == ["engine", "grpc", "http", "rates"]
    assert result["model"]["vocab_size"] == VOCAB_SIZE and result["workload"]["output_tokens"] == sum(output_lens)
    engine = result["runs"]["engine"]
    assert engine["useful_output_tokens"] == sum(output_lens) and not engine["truncated"]
    assert engine["workload"] == result["workload"]  # the baseline ran the very same requests
    assert result["warmup"]["grpc"]["num_errors"] == 0 and result["warmup"]["http"]["num_errors"] == 0
    for name in RUNS:
        run = result["runs"][name]
        _check_service_run(run, name, prompts, output_lens)
        assert run["ratio_to_engine"] == run["output_tokens_per_s"] / engine["useful_output_tokens_per_s"]
        assert run["num_client_processes"] == min(default_client_processes(), NUM_REQUESTS)
    # Poisson arrivals at 4/s: the last request is not sent before its arrival time
    assert result["runs"]["grpc-rate-4"]["wall_seconds"] > poisson_arrivals(NUM_REQUESTS, 4.0, 0)[-1]
    assert set(result["metrics_files"]) == {"prefill-0", "decode-0", "frontend"}
    assert "tandem:" in (tmp_path / "logs" / "metrics-decode-0.txt").read_text()
    spans = json.loads((tmp_path / "logs" / "spans-grpc-inf.json").read_text())
    assert {"kv.send", "kv.recv"} <= {s["name"] for s in spans}
    assert stdout[-5].split()[0] == "run" and stdout[-4].split()[:3] == ["engine", "1", "GPU"]  # the table is last
    assert [line.split()[1] for line in stdout[-3:]] == list(RUNS)
    assert "gap1→2 p50" in stdout[-5]


@pytest.mark.slow
def test_two_client_processes_send_every_request_once_on_the_shared_schedule(tmp_path):
    num_requests, rate = 7, 8.0  # odd: the processes get 4 and 3 requests
    result, stdout = run_bench("disagg.py", [
        "--device", "cpu", "--model", "dummy:tiny", "--num-requests", str(num_requests), "--phases",
        "grpc,http,rates", "--max-input-len", str(MAX_INPUT_LEN), "--max-output-len", str(MAX_OUTPUT_LEN),
        "--rates", f"{rate:g}", "--requests-per-rate", str(num_requests), "--warmup-requests", "3",
        "--client-processes", "2", "--log-dir", str(tmp_path / "logs"),
    ], tmp_path, timeout=240)
    prompts, output_lens = sharegpt_workload(num_requests, VOCAB_SIZE, MAX_INPUT_LEN, MAX_OUTPUT_LEN)
    assert result["failure"] is None and result["phases_done"] == ["grpc", "http", "rates"]
    assert result["settings"]["client_processes"] == 2
    assert result["warmup"]["grpc"] == {**result["warmup"]["grpc"], "num_requests": 3, "num_errors": 0}
    assert result["warmup"]["http"] == {**result["warmup"]["http"], "num_requests": 2, "num_errors": 0}
    runs = {name: result["runs"][name] for name in ("grpc-inf", "http-inf", f"grpc-rate-{rate:g}")}
    for name, run in runs.items():
        _check_service_run(run, name, prompts, output_lens)
        assert run["num_client_processes"] == 2
    # Both processes keep the one schedule: nothing sent before its arrival, nothing long after it.
    for name, arrivals in (("grpc-inf", [0.0] * num_requests),
                           (f"grpc-rate-{rate:g}", poisson_arrivals(num_requests, rate, 0))):
        lags = [r["sent_s"] - arrival for r, arrival in zip(runs[name]["requests"], arrivals)]
        assert all(-1e-3 <= lag < 0.5 for lag in lags), (name, lags)
    assert [line.split()[1] for line in stdout[-3:]] == list(runs)


@pytest.mark.slow
def test_a_service_that_dies_fails_the_run_with_its_log_tail(tmp_path):
    output = tmp_path / "out.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, str(REPO / "bench" / "disagg.py"), "--device", "cpu", "--model", "dummy:tiny",
               "--num-requests", "2", "--phases", "grpc", "--decode-args", "--max-num-seqs 0",
               "--log-dir", str(tmp_path / "logs"), "--output", str(output)]
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert completed.returncode == 1, completed.stdout[-2000:] + completed.stderr[-2000:]
    result = json.loads(output.read_text())
    assert "decode-0 exited with code 2" in result["failure"] and "max_num_seqs" in result["failure"]
    assert result["runs"] == {} and "decode-0 exited with code 2" in completed.stdout


def test_every_run_is_compared_with_the_mixed_step_engine_baseline():
    from bench._disagg_report import add_ratios, is_engine_run

    report = {"runs": {"engine": {"useful_output_tokens_per_s": 200.0},
                       "engine-step-at-a-time": {"useful_output_tokens_per_s": 150.0},
                       "grpc-inf": {"output_tokens_per_s": 220.0}}}
    add_ratios(report)
    assert report["runs"]["engine-step-at-a-time"]["ratio_to_engine"] == 0.75
    assert report["runs"]["grpc-inf"]["ratio_to_engine"] == 1.1
    assert "ratio_to_engine" not in report["runs"]["engine"]
    assert [name for name in report["runs"] if is_engine_run(name)] == ["engine", "engine-step-at-a-time"]
