"""CUDA-graph decode: the ladder, context buckets and split plans, harmless padding, and engines with
graphs giving the same greedy tokens as eager Triton and the reference backend.

On CPU the graph runner keeps every decision (padded batch, bucket, plan) and runs the forward
eagerly instead of replaying (`capture_graphs=False`); the CUDA cases capture and replay.
"""

import random

import pytest
import torch

from common.engine.config import EngineConfig
from common.engine.cuda_graphs import (
    capture_batch_sizes,
    context_buckets,
    decode_split_plan,
    distinct_plan_buckets,
    padded_batch_size,
    select_bucket,
)
from common.engine.llm_engine import LLMEngine
from common.engine.model_runner import ModelRunner
from common.engine.sampling_params import SamplingParams
from common.engine.sequence import Sequence
from common.kv.kv_pool import KVPool
from common.kv.layout import KVLayout
from tests.common.engine.engine_helpers import run_to_completion
from tests.helpers.devices import CPU, on_cuda

H100_SMS = 132


def test_ladder_covers_every_batch_up_to_the_cap():
    assert capture_batch_sizes(256, 256) == [1, 2, 4, 8, 16, 24, 32, 48, 64] + list(range(80, 257, 16))
    assert capture_batch_sizes(100, 256)[-3:] == [80, 96, 100]
    assert capture_batch_sizes(256, 8) == [1, 2, 4, 8]
    assert capture_batch_sizes(3, 256) == [1, 2, 3]
    sizes = capture_batch_sizes(200, 256)
    for num_seqs in range(1, 201):
        padded = padded_batch_size(num_seqs, sizes)
        assert padded >= num_seqs and padded in sizes
        assert padded - num_seqs < max(16, num_seqs // 3 + 1)  # padding stays a small fraction
    assert padded_batch_size(201, sizes) is None  # too big for any graph: runs eagerly
    with pytest.raises(ValueError, match="max_capture_size"):
        capture_batch_sizes(4, 0)


def test_context_buckets_double_up_to_max_model_len():
    assert context_buckets(4096) == [1024, 2048, 4096]
    assert context_buckets(3000) == [1024, 2048, 3000]
    assert context_buckets(1024) == [1024]
    assert context_buckets(300) == [300]
    assert select_bucket(1, [1024, 2048]) == 1024
    assert select_bucket(1025, [1024, 2048]) == 2048
    with pytest.raises(ValueError, match="2049"):
        select_bucket(2049, [1024, 2048])


def test_only_buckets_where_the_plan_changes_are_kept():
    plans = {1024: "a", 2048: "a", 4096: "b", 8192: "c", 16384: "c"}
    assert distinct_plan_buckets(list(plans), plans.get) == [2048, 4096, 16384]
    buckets = context_buckets(131072)
    # Batch 80 x 8 KV heads fills an H100 without splitting: one graph serves every context.
    assert distinct_plan_buckets(buckets, lambda n: decode_split_plan(80, 8, n, H100_SMS)) == [131072]
    assert len(distinct_plan_buckets(buckets, lambda n: decode_split_plan(1, 8, n, H100_SMS))) > 3


@pytest.mark.parametrize("num_seqs", [1, 3, 16, 64])
def test_a_bucket_plan_covers_every_context_it_serves(num_seqs):
    buckets = distinct_plan_buckets(context_buckets(131072), lambda n: decode_split_plan(num_seqs, 8, n, H100_SMS))
    rng = random.Random(num_seqs)
    for context_len in [1, 1023, 1024, 1025, 131072] + [rng.randint(1, 131072) for _ in range(50)]:
        bucket = select_bucket(context_len, buckets)
        num_splits, partition_size = decode_split_plan(num_seqs, 8, bucket, H100_SMS)
        assert num_splits == 1 or num_splits * partition_size >= context_len  # no partition is left unlaunched


def decoding_seqs(block_size: int, context_lens: list[int], seed: int = 0) -> list[Sequence]:
    """Sequences about to decode at the given context lengths, on disjoint blocks 0, 1, 2, ..."""
    rng = random.Random(seed)
    seqs, next_block = [], 0
    for i, context_len in enumerate(context_lens):
        seq = Sequence(f"s{i}", [rng.randrange(3, 512) for _ in range(context_len)], SamplingParams(temperature=0))
        num_blocks = -(-context_len // block_size)
        seq.block_table = list(range(next_block, next_block + num_blocks))
        seq.num_computed_tokens = context_len - 1
        seqs.append(seq)
        next_block += num_blocks
    return seqs


@torch.inference_mode()
def test_padding_rows_change_neither_logits_nor_sequence_kv(tiny_model):
    model, config = tiny_model
    layout = KVLayout(model_name="tiny", num_layers=config.num_hidden_layers, block_size=4,
                      num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim, dtype="float32")
    pool = KVPool(layout, 64, "cpu")
    pool.kv.copy_(torch.randn_like(pool.kv))  # finite values everywhere a stray read could reach
    scratch = 63
    runner = ModelRunner(model, pool, torch.device("cpu"), 0, max_num_seqs=8, max_model_len=128,
                         scratch_block_id=scratch, use_cuda_graphs=True, capture_graphs=False)
    seqs = decoding_seqs(4, [5, 17, 9])
    initial = pool.kv.clone()
    batch = runner.decode_buffers.prepare(seqs, 3)
    unpadded = runner.decode_forward(3, batch.max_context_len).clone()
    kv_unpadded = pool.kv.clone()
    pool.kv.copy_(initial)
    batch = runner.decode_buffers.prepare(seqs, runner.graph_runner.padded_size(3))
    assert batch.num_rows == 4
    padded = runner.graph_runner.replay(batch)[:3]
    torch.testing.assert_close(padded, unpadded, rtol=1e-5, atol=1e-5)
    # Only the new tokens' slots and the scratch block changed; the new K/V match the unpadded run's.
    changed = (pool.kv != initial).flatten(4).any(-1).any(0).any(0)  # [num_blocks, block_size]
    new_slots = {(seq.block_table[-1], (seq.num_computed_tokens) % 4) for seq in seqs}
    assert {tuple(slot) for slot in changed.nonzero().tolist() if slot[0] != scratch} == new_slots
    for block, offset in new_slots:
        torch.testing.assert_close(pool.kv[:, :, block, offset], kv_unpadded[:, :, block, offset])


def build_engine(folder, device: str, mode: str, **overrides) -> LLMEngine:
    """mode: 'graphs' (CPU: the runner's decisions without capture), 'eager' or 'reference'."""
    settings = dict(model=str(folder), device=device, dtype="float32", block_size=16, max_model_len=2048,
                    max_num_seqs=32, max_num_batched_tokens=4096, num_kv_blocks=1200,
                    attention_backend="reference" if mode == "reference" else "auto",
                    enforce_eager=mode == "eager")
    settings.update(overrides)
    engine = LLMEngine(EngineConfig(**settings))
    if mode == "graphs" and device == "cpu":
        config = engine.config
        engine.model_runner = ModelRunner(
            engine.model, engine.kv_pool, engine.device, config.seed, max_num_seqs=config.max_num_seqs,
            max_model_len=engine.max_model_len, scratch_block_id=engine.allocator.num_blocks,
            use_cuda_graphs=True, capture_graphs=False,
        )
    runner = engine.model_runner
    assert (runner.graph_runner is not None) == (mode == "graphs")
    if mode == "graphs":
        assert runner.graph_runner.is_captured == (device == "cuda")
    return engine


def waves_of_requests(seed: int = 0) -> list[list[tuple[list[int], int]]]:
    """Batches of 3, 5 and 17 (prompt, max_tokens): batches shrink through padded sizes as requests
    finish, and two long prompts decode past 1024 tokens (the next context bucket)."""
    rng = random.Random(seed)
    waves = []
    for size in (3, 5, 17):
        wave = [([rng.randrange(3, 512) for _ in range(rng.randint(2, 60))], rng.randint(3, 20)) for _ in range(size)]
        waves.append(wave)
    waves[2][0] = ([rng.randrange(3, 512) for _ in range(1015)], 20)
    waves[2][1] = ([rng.randrange(3, 512) for _ in range(1100)], 6)
    return waves


def greedy_tokens(engine: LLMEngine, waves) -> dict[str, list[int]]:
    tokens = {}
    for wave_index, wave in enumerate(waves):
        for i, (prompt, max_tokens) in enumerate(wave):
            params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
            engine.add_request(f"w{wave_index}-{i}", prompt, params)
        wave_tokens, _ = run_to_completion(engine)
        tokens.update(wave_tokens)
    return tokens


@pytest.mark.parametrize("device", [CPU, on_cuda("cuda", id="cuda")])
def test_graph_decode_matches_eager_and_reference_token_for_token(tiny_folder, device):
    waves = waves_of_requests()
    expected = greedy_tokens(build_engine(tiny_folder, device, "eager", async_scheduling=False), waves)
    assert sum(map(len, expected.values())) == sum(n for wave in waves for _, n in wave)
    assert greedy_tokens(build_engine(tiny_folder, device, "graphs", async_scheduling=False), waves) == expected
    # Asynchronous scheduling: the next step launched (graph replay included) before these tokens are read.
    assert greedy_tokens(build_engine(tiny_folder, device, "graphs"), waves) == expected
    assert greedy_tokens(build_engine(tiny_folder, device, "eager"), waves) == expected
    if device == "cuda":  # on CPU "eager" already is the reference backend
        assert greedy_tokens(build_engine(tiny_folder, device, "reference"), waves) == expected


def test_graph_path_with_triton_kernels_in_the_interpreter(tiny_folder, monkeypatch):
    """The Triton decode kernel under a bucket plan longer than every context, with padding rows, and
    the fused RMSNorm, RoPE and SiLU-and-mul kernels: the same greedy tokens as the reference backend."""
    import kernels.activation

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    activation_calls = {"triton": 0, "reference": 0}
    backend = None
    fused_activation = kernels.activation.silu_and_mul

    def counted_activation(*args, **kwargs):
        activation_calls[backend] += 1
        return fused_activation(*args, **kwargs)

    monkeypatch.setattr(kernels.activation, "silu_and_mul", counted_activation)
    prompts = [[5, 9, 200, 31], list(range(40, 340)), [7] * 17]  # 300 tokens: two partitions of 256
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    results = []
    for mode, backend in (("graphs", "triton"), ("eager", "reference")):
        engine = build_engine(tiny_folder, "cpu", mode, attention_backend=backend, num_kv_blocks=64,
                              max_model_len=1024)
        if mode == "graphs":  # 4 rows x 2 KV heads: the 1024-token plan splits into 4 x 256 tokens
            assert engine.model_runner.graph_runner.buckets[4] == [1024]
            assert decode_split_plan(4, 2, 1024, H100_SMS) == (4, 256)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        results.append(run_to_completion(engine)[0])
    assert results[0] == results[1]
    assert activation_calls["triton"] > 0 and activation_calls["reference"] == 0
