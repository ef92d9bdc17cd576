"""bench/decode_step.py on CPU: the engine's runner timed per case, against a roofline from the same run."""

from tests.bench.bench_helpers import run_bench


def test_decode_step_reports_each_case_against_its_roofline(tmp_path):
    result, stdout = run_bench("decode_step.py", [
        "--device", "cpu", "--model", "dummy:tiny", "--cases", "1:32,3:64", "--repeats", "2",
        "--max-model-len", "128", "--copy-mib", "8",
    ], tmp_path)
    assert result["modes"] == ["eager"]  # CUDA graphs need CUDA
    assert [(c["batch"], c["context_len"]) for c in result["cases"]] == [(1, 32), (3, 64)]
    copy_gbps = result["copy"]["gbps"]
    kv_per_token = 2 * 2 * 2 * 32 * 4  # K and V x 2 layers x 2 KV heads x head_dim 32 x fp32 ("tiny" preset)
    for case in result["cases"]:
        assert case["kv_bytes"] == case["batch"] * case["context_len"] * kv_per_token
        roofline_ms = (result["model"]["parameter_bytes"] + case["kv_bytes"]) / copy_gbps / 1e6
        assert abs(case["roofline_ms"] - roofline_ms) < 1e-9
        assert case["ratio"] == case["median_ms"] / case["roofline_ms"] and case["ratio"] > 0
        assert case["tokens_per_s"] > 0
    assert result["cases"][0]["target_ratio"] == 1.25
    assert stdout[-1].split()[:3] == ["3", "64", "eager"]  # the table is printed last
