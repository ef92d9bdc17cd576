"""The kernel warm-up: after it, serving launches no kernel variant it did not, and it leaves the engine
as it found it (state, outputs, the shared sampling generator).

On CPU the Triton kernels run in the interpreter, where nothing compiles: the variant keys the
launchers record (kernels.launch_utils) stand in for compiles. The CUDA case checks the compile
count itself.
"""

from dataclasses import dataclass, replace

import pytest
import torch

from common.engine.config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.engine.model_runner import ModelRunner
from common.engine.sampling_params import SamplingParams
from common.engine.warmup import decode_shapes, prefill_steps, warm_up
from kernels.launch_utils import num_compiled_variants, recording_variant_keys
from tests.common.engine.engine_helpers import run_to_completion
from tests.helpers.devices import CPU, on_cuda
from tests.helpers.tiny_models import make_tiny_hf_model

MAX_MODEL_LEN = 600  # long enough for the decode kernel to split a context in two
VOCAB_SIZE = 64  # small projections: the interpreter runs one GEMV program per 4 output features
LADDER_MAX = 2  # decode batches of 3 and more run eagerly


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("warmup"), num_layers=1, num_heads=2, num_kv_heads=1,
                              head_dim=32, hidden_size=64, intermediate_size=64, vocab_size=VOCAB_SIZE)


def build_engine(folder, device: str, attention_backend: str = "triton") -> LLMEngine:
    """A bf16 engine (the GEMV runs on half precision only) whose decode batches past 2 run eagerly."""
    config = EngineConfig(model=str(folder), device=device, dtype="bfloat16", attention_backend=attention_backend,
                          block_size=16, max_model_len=MAX_MODEL_LEN, max_num_seqs=8, max_num_batched_tokens=64,
                          num_kv_blocks=64, cuda_graph_max_batch_size=LADDER_MAX)
    engine = LLMEngine(config)
    if device == "cpu":  # the graph runner's decisions without capture, as on CUDA
        engine.model_runner = ModelRunner(
            engine.model, engine.kv_pool, engine.device, config.seed, max_num_seqs=config.max_num_seqs,
            max_model_len=engine.max_model_len, scratch_block_id=engine.allocator.num_blocks,
            use_cuda_graphs=True, cuda_graph_max_batch_size=LADDER_MAX, capture_graphs=False,
        )
    return engine


def serve_workload(engine: LLMEngine) -> dict:
    """Ragged prompts (one of 1 token, two chunked over the 64-token budget) with greedy, seeded,
    unseeded and logprob sampling; decode batches shrink from 8 through the ladder as requests end.
    Then a wave of two short prompts: a 3-token prefill step, then decode at 2 rows."""
    samplings = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.9, top_k=20, seed=7),
        SamplingParams(temperature=1.0),  # unseeded: draws from the engine's shared generator
        SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.3),
    ]
    tokens = {}
    for wave, lengths in enumerate([[1, 3, 16, 17, 60, 100, 5, 2], [2, 1]]):
        for i, length in enumerate(lengths):
            prompt = [(7 * position + 3 * length) % VOCAB_SIZE for position in range(length)]
            params = replace(samplings[i % len(samplings)], max_tokens=2 + i % 5, ignore_eos=True)
            engine.add_request(f"w{wave}-{i}", prompt, params)
        tokens.update(run_to_completion(engine)[0])
    return tokens


@dataclass
class WarmRun:
    device: str
    warm_keys: set  # recorded by warm_up
    served_keys: set  # recorded serving the workload right after
    outputs: dict  # the workload's tokens
    cold_keys: set  # recorded serving the workload on an engine never warmed up
    cold_outputs: dict
    small_warm_keys: set  # recorded by a one-step "warm-up": a single 16-token prompt
    state_before: tuple  # engine_state() before and after warm_up
    state_after: tuple
    num_compiles_serving: int  # Triton compiles while serving after the warm-up


def engine_state(engine: LLMEngine) -> tuple:
    return (engine.stats(), engine.allocator.num_free_blocks, engine.has_unfinished_requests(),
            engine.model_runner.sampler.generator.get_state())


@pytest.fixture(scope="module", params=[CPU, on_cuda("cuda", id="cuda")])
def warm_run(request, tiny_folder) -> WarmRun:
    device = request.param
    with pytest.MonkeyPatch.context() as patch:
        if device == "cpu":
            patch.setenv("TRITON_INTERPRET", "1")
        else:
            patch.delenv("TRITON_INTERPRET", raising=False)
        engine = build_engine(tiny_folder, device)
        state_before = engine_state(engine)
        with recording_variant_keys() as warm_keys:
            warm_up(engine)
        state_after = engine_state(engine)
        num_compiled = num_compiled_variants()
        with recording_variant_keys() as served_keys:
            outputs = serve_workload(engine)
        num_compiles_serving = num_compiled_variants() - num_compiled

        cold = build_engine(tiny_folder, device)
        with recording_variant_keys() as cold_keys:
            cold_outputs = serve_workload(cold)
        with recording_variant_keys() as small_warm_keys:
            cold.add_request("small", list(range(16)), SamplingParams(temperature=0, max_tokens=1))
            run_to_completion(cold)
    return WarmRun(device, warm_keys, served_keys, outputs, cold_keys, cold_outputs, small_warm_keys, state_before,
                   state_after, num_compiles_serving)


@pytest.mark.slow  # ~20 s of interpreted kernels on 2 cores, shared by the three tests
def test_serving_after_warm_up_needs_no_new_variant(warm_run):
    kernel_names = {key[0] for key in warm_run.served_keys}
    assert {"_prefill_attention_kernel", "_paged_decode_kernel", "_gemv_kernel", "_silu_and_mul_kernel",
            "_rms_norm_kernel", "_rotary_kernel", "_write_kv_cache_kernel"} <= kernel_names
    if warm_run.device == "cpu":  # batches of 1 and 2 run their graphs' split plan; CUDA replays launch nothing
        assert "_reduce_splits_kernel" in kernel_names
    assert warm_run.served_keys <= warm_run.warm_keys, sorted(warm_run.served_keys - warm_run.warm_keys)
    assert warm_run.cold_keys <= warm_run.warm_keys
    assert warm_run.num_compiles_serving == 0  # 0 by construction in the interpreter: the CUDA case counts


@pytest.mark.slow
def test_a_too_small_warm_up_misses_variants_the_workload_needs(warm_run):
    missing = warm_run.cold_keys - warm_run.small_warm_keys
    missing_kernels = {key[0] for key in missing}
    assert {"_paged_decode_kernel", "_gemv_kernel"} <= missing_kernels
    gemv_rows = {part for key in missing if key[0] == "_gemv_kernel" for part in key[1] if part.startswith("NUM_ROWS")}
    assert gemv_rows >= {"NUM_ROWS=2", "NUM_ROWS=3", "NUM_ROWS=4"}  # from eager steps on CUDA too


@pytest.mark.slow
def test_warm_up_leaves_state_and_outputs_unchanged(warm_run):
    stats, num_free_blocks, has_requests, generator_state = warm_run.state_after
    expected_stats, expected_free, _, expected_generator = warm_run.state_before
    assert stats == expected_stats and num_free_blocks == expected_free and not has_requests
    assert torch.equal(generator_state, expected_generator)
    assert warm_run.outputs == warm_run.cold_outputs  # greedy, seeded and shared-generator draws alike
    assert sum(map(len, warm_run.outputs.values())) == sum(2 + i % 5 for i in range(8)) + 2 + 3


def test_warm_up_steps_fit_the_engine_and_cover_gemv_rows(tiny_folder):
    engine = build_engine(tiny_folder, "cpu")
    steps = prefill_steps(engine)
    assert {sum(q.query_len for q in step) for step in steps} >= {1, 2, 3, 4, 16, 17}
    assert any(len(step) > 1 and all(q.query_len == 1 for q in step) for step in steps)  # one-token queries
    assert any(not q.is_sampled for step in steps for q in step)  # a chunk that samples nothing
    for step in steps:
        assert sum(q.query_len for q in step) <= 64 and max(q.context_len for q in step) < MAX_MODEL_LEN
    shapes = decode_shapes(engine)
    assert {rows for rows, _ in shapes} == {1, 2, 3, 4, LADDER_MAX + 1}
    assert (1, MAX_MODEL_LEN) in shapes


def test_warm_up_launches_nothing_on_the_reference_backend(tiny_folder):
    engine = build_engine(tiny_folder, "cpu", attention_backend="reference")
    with recording_variant_keys() as keys:
        warm_up(engine)
    assert keys == set()
