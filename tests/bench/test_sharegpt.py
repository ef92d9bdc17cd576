"""bench/sharegpt.py: the workload's definition, the transformers twin sharing Tandem's weights, merging
runs, and a CPU run of every system end to end."""

import json
import statistics

import pytest
import torch

from bench._common import load_benchmark_model
from common.attention import AttentionMetadata
from bench._transformers_baselines import transformers_twin
from bench.sharegpt import add_ratios, merge, sharegpt_workload, workload_summary
from tests.bench.bench_helpers import run_bench


def test_workload_follows_the_shared_definition():
    prompts, output_lens = sharegpt_workload(1000, vocab_size=128256)
    input_lens = list(map(len, prompts))
    assert min(input_lens) >= 4 and max(input_lens) == 1024  # clipped, and the clip is reached
    assert min(output_lens) >= 4 and max(output_lens) == 512
    # lognormal(ln m - 0.5, 1) has median m e^-0.5: 121 input and 109 output tokens
    assert 110 < statistics.median(input_lens) < 135 and 98 < statistics.median(output_lens) < 122
    assert all(0 <= t < 128256 for prompt in prompts[:20] for t in prompt)
    again, again_outputs = sharegpt_workload(1000, vocab_size=128256)
    assert again == prompts and again_outputs == output_lens  # fixed seed
    assert workload_summary(prompts, output_lens)["output_tokens"] == sum(output_lens)


@torch.inference_mode()
def test_transformers_twin_shares_weights_and_computes_the_same_logits():
    model, config = load_benchmark_model("dummy:tiny", torch.device("cpu"), "float32", seed=3)
    twin = transformers_twin(model, config)
    shared = twin.model.layers[0].self_attn.q_proj.weight.data_ptr()
    assert shared == model.model.layers[0].self_attn.qkv_proj.weight.data_ptr()  # a view, not a copy
    prompt = torch.tensor([[5, 77, 301, 12, 9, 450, 3]])
    theirs = twin(prompt).logits[0].float()  # [T, V]
    num_tokens = prompt.shape[1]
    kv = torch.zeros(config.num_hidden_layers, 2, 1, 8, config.num_key_value_heads, config.head_dim)
    metadata = AttentionMetadata.build([num_tokens], [num_tokens], [[0]], 8)
    hidden = model(prompt[0], torch.arange(num_tokens), kv, metadata)
    ours = model.compute_logits(hidden)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4 * theirs.abs().max().item())


def test_merge_combines_runs_of_one_workload_and_refuses_others(tmp_path):
    base = {"model": "dummy:tiny", "workload": {"num_requests": 8, "lengths_sha256": "ab"}, "environment": {}}
    parts = [dict(base, results={"tandem": {"useful_output_tokens_per_s": 300.0}}),
             dict(base, results={"static": {"useful_output_tokens_per_s": 100.0}}),
             dict(base, results={"cb": {"useful_output_tokens_per_s": 150.0}})]
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(part))
    merged = merge([str(p) for p in paths])
    add_ratios(merged)
    assert set(merged["results"]) == {"tandem", "static", "cb"}
    assert merged["ratios"] == {"tandem/static": 3.0, "tandem/cb": 2.0}
    other = tmp_path / "other.json"
    other.write_text(json.dumps(dict(base, workload={"num_requests": 9}, results={})))
    with pytest.raises(SystemExit, match="different workload"):
        merge([str(paths[0]), str(other)])


def test_cpu_run_of_all_systems_counts_only_useful_tokens(tmp_path):
    result, stdout = run_bench("sharegpt.py", [
        "--device", "cpu", "--model", "dummy:tiny", "--num-requests", "6", "--static-requests", "4",
        "--static-batch-size", "2", "--max-input-len", "40", "--max-output-len", "10",
    ], tmp_path)
    _, output_lens = sharegpt_workload(6, 512, 40, 10)
    runs = result["results"]
    assert runs["tandem"]["useful_output_tokens"] == sum(output_lens) and not runs["tandem"]["truncated"]
    assert runs["static"]["useful_output_tokens"] == sum(output_lens[:4])
    assert runs["cb"]["useful_output_tokens"] == sum(output_lens)
    assert set(result["ratios"]) == {"tandem/static", "tandem/cb"}
    assert "tandem is" in stdout[-4] and "continuous batching" in stdout[-1]  # the table is printed last


def test_cpu_run_of_mixed_steps_and_the_step_at_a_time_engine_in_one_command(tmp_path):
    result, stdout = run_bench("sharegpt.py", [
        "--device", "cpu", "--model", "dummy:tiny", "--num-requests", "6", "--max-input-len", "40",
        "--max-output-len", "10", "--max-num-seqs", "4", "--max-num-batched-tokens", "16", "--baselines", "none",
        "--compare-step-at-a-time",
    ], tmp_path)
    _, output_lens = sharegpt_workload(6, 512, 40, 10)
    runs = result["results"]
    assert set(runs) == {"tandem", "tandem-step-at-a-time"}
    assert runs["tandem"]["enable_chunked_prefill"] and not runs["tandem-step-at-a-time"]["enable_chunked_prefill"]
    for run in runs.values():
        assert run["useful_output_tokens"] == sum(output_lens) and not run["truncated"]
    # mixed steps fold prompt chunks into decode steps: fewer steps for the same tokens
    assert runs["tandem"]["steps"] < runs["tandem-step-at-a-time"]["steps"]
    assert set(result["ratios"]) == {"tandem/tandem-step-at-a-time"}
    assert "step at a time" in stdout[-1] or "step at a time" in stdout[-2]
