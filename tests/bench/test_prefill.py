"""bench/prefill.py: model FLOPs counted from the layers themselves, and a CPU run end to end."""

import torch

from bench.prefill import parameter_counts, prefill_flops
from common.attention import get_attention_backend
from common.model.config import ModelConfig
from common.model.weights import build_empty_model
from tests.bench.bench_helpers import run_bench


def test_flops_count_every_linear_layer_once_per_token_and_the_head_once():
    config = ModelConfig.llama_shape("tiny")
    model = build_empty_model(config, get_attention_backend("reference", torch.device("cpu")), torch.float32, "cpu")
    num_tokens = 10
    layer_linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers." in name]
    expected_matmuls = sum(2 * m.in_features * m.out_features for m in layer_linears) * num_tokens
    expected_matmuls += 2 * config.hidden_size * config.vocab_size  # logits of the last token
    flops = prefill_flops(config, parameter_counts(model), num_tokens)
    assert flops["matmul"] == expected_matmuls
    pairs = num_tokens * (num_tokens + 1) // 2
    assert flops["attention"] == 4 * config.num_attention_heads * config.head_dim * pairs * config.num_hidden_layers


def test_prefill_cpu_run_reports_a_fraction_of_the_matmul_rate(tmp_path):
    result, stdout = run_bench("prefill.py", [
        "--device", "cpu", "--model", "dummy:tiny", "--prompt-len", "40", "--matmul-size", "128", "--repeats", "2",
    ], tmp_path)
    assert result["prompt_len"] == 40 and result["matmul"]["tflops"] > 0
    seconds = result["median_ms"] / 1e3
    assert abs(result["model_tflops"] - result["flops"]["model"] / seconds / 1e12) < 1e-12
    assert result["fraction_of_matmul"] == result["model_tflops"] / result["matmul"]["tflops"]
    assert "of matmul" in stdout[-2] and ">= 0.5" in stdout[-1]  # the table is printed last
