"""EngineConfig validation and the vLLM-named command-line flags."""

import argparse

import pytest

from common.engine.args import add_engine_args, engine_config_from_args, parse_memory_size
from common.engine.config import EngineConfig


@pytest.mark.parametrize(
    "field, value",
    [("load_format", "pt"), ("dtype", "int8"), ("device", "tpu"), ("device", "cuda:x"), ("block_size", 0),
     ("max_num_seqs", -1), ("max_model_len", 0), ("num_kv_blocks", 1.5), ("kv_cache_memory_bytes", 0),
     ("gpu_memory_utilization", 1.2), ("attention_backend", "flash"), ("seed", "1"), ("model", ""),
     ("enforce_eager", 1), ("cuda_graph_max_batch_size", 0)],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: value})


def test_token_budget_must_cover_the_batch():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig(max_num_seqs=64, max_num_batched_tokens=32)


def test_flags_map_to_config():
    parser = add_engine_args(argparse.ArgumentParser())
    args = parser.parse_args([
        "--model", "dummy:tiny", "--dtype", "bfloat16", "--load-format", "dummy", "--block-size", "32",
        "--max-num-seqs", "8", "--max-num-batched-tokens", "512", "--max-model-len", "1024",
        "--gpu-memory-utilization", "0.5", "--kv-cache-memory", "2GiB", "--num-kv-blocks", "100",
        "--device", "cpu", "--seed", "7", "--attention-backend", "reference", "--enforce-eager",
        "--cuda-graph-max-batch-size", "64",
    ])
    assert engine_config_from_args(args) == EngineConfig(
        model="dummy:tiny", dtype="bfloat16", load_format="dummy", block_size=32, max_num_seqs=8,
        max_num_batched_tokens=512, max_model_len=1024, gpu_memory_utilization=0.5,
        kv_cache_memory_bytes=2 * 2**30, num_kv_blocks=100, device="cpu", seed=7, attention_backend="reference",
        enforce_eager=True, cuda_graph_max_batch_size=64,
    )
    vllm_name = parser.parse_args(["--max-cudagraph-capture-size", "32"])
    assert engine_config_from_args(vllm_name).cuda_graph_max_batch_size == 32
    assert engine_config_from_args(parser.parse_args([])) == EngineConfig()


def test_memory_sizes():
    assert parse_memory_size("512MiB") == 512 * 2**20
    assert parse_memory_size("1.5GB") == 1_500_000_000
    assert parse_memory_size("4096") == 4096
    with pytest.raises(argparse.ArgumentTypeError, match="invalid memory size"):
        parse_memory_size("lots")
