"""bench/disagg.py: the served model folder, arrivals, and a CPU run of every phase through real
prefill, decode and frontend processes (tiny model, the embedded tokenizer's vocabulary)."""

import json
import math
import os
import subprocess
import sys

import pytest

from bench._common import poisson_arrivals
from bench.disagg import hf_config, write_synthetic_tokenizer
from bench.sharegpt import sharegpt_workload
from common.model.config import PRESETS, ModelConfig
from tests.bench.bench_helpers import REPO, run_bench

NUM_REQUESTS, MAX_INPUT_LEN, MAX_OUTPUT_LEN, VOCAB_SIZE = 6, 64, 12, 49152
RUNS = ("grpc-inf", "http-inf", "grpc-rate-4")
RUN_FIELDS = {
    "name", "api", "rate", "num_requests", "num_completed", "output_tokens", "asked_tokens", "wall_seconds",
    "output_tokens_per_s", "ratio_to_engine", "ttft_ms", "itl_ms", "tpot_ms", "e2e_ms", "num_errors",
    "error_messages", "truncated", "kv", "compiles", "compiles_total", "compiles_after_ready",
    "bench_process_cpu_fraction", "worker_stats", "requests",
}
KV_FIELDS = {"num_sends", "num_recvs", "send_ms", "recv_ms", "gb_per_s", "bytes", "total_bytes", "transports",
             "ttft_share", "num_failed_spans"}


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


def _kv_bytes(num_prompt_tokens: int) -> int:
    """Whole 16-token blocks x K and V x 2 layers x 2 KV heads x head_dim 32 x fp32 ("tiny" preset)."""
    return math.ceil(num_prompt_tokens / 16) * 16 * 2 * 2 * 2 * 32 * 4


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
        assert set(run) == RUN_FIELDS and set(run["kv"]) == KV_FIELDS, name
        assert [(r["prompt_tokens"], r["num_tokens"], r["usage_tokens"], r["error"]) for r in run["requests"]] == [
            (len(p), n, n, None) for p, n in zip(prompts, output_lens)], name
        assert (run["num_completed"], run["num_errors"], run["truncated"]) == (NUM_REQUESTS, 0, False)
        assert run["output_tokens"] == sum(output_lens)
        assert run["output_tokens_per_s"] == run["output_tokens"] / run["wall_seconds"]
        assert run["ratio_to_engine"] == run["output_tokens_per_s"] / engine["useful_output_tokens_per_s"]
        for key in ("ttft_ms", "itl_ms", "tpot_ms"):
            assert 0 < run[key]["p50"] <= run[key]["p99"], (name, key)
        kv = run["kv"]  # one hand-off per request, each moving exactly its prompt's whole blocks
        assert kv["num_sends"] == kv["num_recvs"] == NUM_REQUESTS and kv["num_failed_spans"] == 0
        assert kv["total_bytes"] == sum(_kv_bytes(len(p)) for p in prompts)
        assert sum(kv["transports"]["send"].values()) == NUM_REQUESTS
        assert "None" not in kv["transports"]["send"] and "fake" not in kv["transports"]["send"]
        assert 0 < kv["send_ms"]["p50"] and 0 < kv["gb_per_s"]["p50"] and 0 < kv["ttft_share"]["p50"] < 1
        assert set(run["compiles"]) == {"prefill-0", "decode-0"}
        assert all(v is None or v >= 0 for v in run["compiles"].values())
    # Poisson arrivals at 4/s: the last request is not sent before its arrival time
    assert result["runs"]["grpc-rate-4"]["wall_seconds"] > poisson_arrivals(NUM_REQUESTS, 4.0, 0)[-1]
    assert set(result["metrics_files"]) == {"prefill-0", "decode-0", "frontend"}
    assert "tandem:" in (tmp_path / "logs" / "metrics-decode-0.txt").read_text()
    spans = json.loads((tmp_path / "logs" / "spans-grpc-inf.json").read_text())
    assert {"kv.send", "kv.recv"} <= {s["name"] for s in spans}
    assert stdout[-5].split()[0] == "run" and stdout[-4].split()[:3] == ["engine", "1", "GPU"]  # the table is last
    assert [line.split()[1] for line in stdout[-3:]] == list(RUNS)


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
