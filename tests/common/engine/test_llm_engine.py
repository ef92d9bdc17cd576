"""LLMEngine on a tiny random Llama: batching, preemption, chunking, stops, aborts, logprobs."""

import random

import pytest
import torch

from common.engine.sampling_params import SamplingParams
from tests.common.engine.engine_helpers import hf_greedy, run_to_completion

GREEDY = dict(temperature=0, ignore_eos=True)


def random_prompts(num_prompts, min_len=3, max_len=20, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(min_len, max_len))] for _ in range(num_prompts)]


def test_greedy_with_staggered_arrivals_matches_transformers(make_engine, hf_tiny):
    engine = make_engine()
    prompts = random_prompts(6)
    max_tokens = [10, 4, 12, 7, 9, 5]
    arrivals = {0: [0, 1, 2], 2: [3], 3: [4], 6: [5]}  # step index -> requests added before it
    tokens: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrivals) or engine.has_unfinished_requests():
        for i in arrivals.get(step, []):
            engine.add_request(f"r{i}", prompts[i], SamplingParams(max_tokens=max_tokens[i], **GREEDY))
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        step += 1
    for i, prompt in enumerate(prompts):
        expected, _ = hf_greedy(hf_tiny, prompt, max_tokens[i])
        assert tokens[f"r{i}"] == expected, f"request {i}"
    stats = engine.stats()
    assert stats.kv_cache_usage == 0 and stats.num_running == 0
    assert stats.prompt_tokens_total == sum(map(len, prompts))
    assert stats.generation_tokens_total == sum(max_tokens)


def record_plans(engine):
    plans = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        plans.append(schedule())
        return plans[-1]

    engine.scheduler.schedule = recording_schedule
    return plans


@pytest.mark.parametrize("enable_chunked_prefill", [False, True])
def test_join_at_next_step_and_leave_at_once(make_engine, enable_chunked_prefill):
    # step by step; the overlapped engine: test_async_scheduling
    engine = make_engine(async_scheduling=False, enable_chunked_prefill=enable_chunked_prefill)
    plans = record_plans(engine)
    prompts = random_prompts(3, seed=1)
    engine.add_request("a", prompts[0], SamplingParams(max_tokens=8, **GREEDY))
    engine.add_request("b", prompts[1], SamplingParams(max_tokens=3, **GREEDY))
    engine.step()
    engine.step()
    assert [p.request_ids for p in plans] == [["a", "b"], ["a", "b"]] and not plans[1].is_prefill
    engine.add_request("c", prompts[2], SamplingParams(max_tokens=5, **GREEDY))  # arrives mid-decode
    outputs = engine.step()
    # mixed: c's prefill rides with a's and b's decodes; step at a time: c alone, a and b wait a step
    assert plans[-1].is_prefill and plans[-1].request_ids == (["a", "b", "c"] if enable_chunked_prefill else ["c"])
    if not enable_chunked_prefill:
        outputs = engine.step()
    assert plans[-1].request_ids == ["a", "b", "c"]
    assert [(o.request_id, o.finish_reason) for o in outputs if o.finished] == [("b", "length")]
    engine.step()
    assert plans[-1].request_ids == ["a", "c"]  # b left at once


def test_preemption_recomputes_and_keeps_tokens_identical(make_engine):
    prompts = random_prompts(8, min_len=8, max_len=14, seed=2)
    params = [SamplingParams(max_tokens=20, **GREEDY) if i % 2 else
              SamplingParams(max_tokens=20, temperature=0.9, top_k=40, seed=100 + i, ignore_eos=True)
              for i in range(8)]
    results = []
    for num_kv_blocks in (128, 17):  # 17 blocks of 4 tokens: room for about two full sequences
        engine = make_engine(num_kv_blocks=num_kv_blocks, max_model_len=64)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params[i])
        tokens, _ = run_to_completion(engine)
        results.append((tokens, engine.stats()))
    (ample, ample_stats), (small, small_stats) = results
    assert ample_stats.num_preemptions == 0 and small_stats.num_preemptions > 0
    assert small == ample
    assert small_stats.kv_cache_usage == 0


def test_chunked_prefill_matches_transformers(make_engine, hf_tiny):
    engine = make_engine(max_num_batched_tokens=8, max_num_seqs=8)
    plans = record_plans(engine)
    prompts = random_prompts(3, min_len=17, max_len=30, seed=3)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=6, **GREEDY))
    tokens, _ = run_to_completion(engine)
    assert max(p.num_batched_tokens for p in plans) == 8
    for i, prompt in enumerate(prompts):
        assert tokens[f"r{i}"] == hf_greedy(hf_tiny, prompt, 6)[0]


def test_seeded_request_same_alone_and_in_mixed_batch_of_16(make_engine):
    prompts = random_prompts(16, seed=4)
    target = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.02, seed=7, max_tokens=16,
                            ignore_eos=True)
    engine = make_engine()
    engine.add_request("target", prompts[0], target)
    alone, _ = run_to_completion(engine)
    mixes = [
        SamplingParams(max_tokens=9, **GREEDY),
        SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True),  # engine generator
        SamplingParams(temperature=0.7, seed=3, repetition_penalty=1.3, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=1.2, frequency_penalty=0.5, presence_penalty=0.3, max_tokens=5,
                       ignore_eos=True, logprobs=3),
    ]
    engine = make_engine(seed=123)
    early_tokens = []
    for i in range(1, 16):
        engine.add_request(f"other{i}", prompts[i], mixes[i % len(mixes)])
        if i == 8:
            engine.add_request("target", prompts[0], target)
        if i % 5 == 0:  # the target joins a batch already in flight
            early_tokens += [t for o in engine.step() if o.request_id == "target" for t in o.new_token_ids]
    mixed, _ = run_to_completion(engine)
    assert early_tokens + mixed["target"] == alone["target"]
    assert len(set(alone["target"])) > 3  # really sampled, not a constant


def test_stop_token_min_tokens_eos_and_max_model_len(make_engine, tiny_model):
    prompt = random_prompts(1, seed=5)[0]
    engine = make_engine()
    engine.add_request("free", prompt, SamplingParams(max_tokens=30, **GREEDY))
    free = run_to_completion(engine)[0]["free"]
    stop = free[4]
    first = free.index(stop)

    def finish(engine_, **params):
        engine_.add_request("x", prompt, SamplingParams(max_tokens=30, temperature=0, **params))
        tokens, reasons = run_to_completion(engine_)
        return tokens["x"], reasons["x"]

    assert finish(make_engine(), stop_token_ids=[stop], ignore_eos=True) == (free[: first + 1], "stop")
    later = [j for j, t in enumerate(free) if t == stop and j >= 6]
    expected = (free[: later[0] + 1], "stop") if later else (free, "length")
    assert finish(make_engine(), stop_token_ids=[stop], min_tokens=7, ignore_eos=True) == expected
    model, model_config = tiny_model
    from common.engine.config import EngineConfig
    from common.engine.llm_engine import LLMEngine

    eos_engine = LLMEngine(
        make_engine().config, model=model, model_config=model_config.with_overrides(eos_token_ids=(stop,))
    )
    assert finish(eos_engine) == (free[: first + 1], "stop")
    assert finish(eos_engine, ignore_eos=True) == (free, "length")
    short = make_engine(max_model_len=len(prompt) + 5)
    assert finish(short, ignore_eos=True) == (free[:5], "length")
    assert isinstance(short.config, EngineConfig)


def test_abort_frees_blocks_and_reports_once(make_engine):
    engine = make_engine()
    prompts = random_prompts(3, seed=6)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, SamplingParams(max_tokens=50, **GREEDY))
    engine.step()
    engine.step()
    engine.abort_request("r1")
    engine.abort_request("r1")  # idempotent
    engine.abort_request("unknown")
    outputs = engine.step()
    aborted = [o for o in outputs if o.request_id == "r1"]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].finish_reason == "abort"
    assert aborted[0].new_token_ids == [] and aborted[0].num_output_tokens == 2
    assert sorted(o.request_id for o in outputs if o.request_id != "r1") == ["r0", "r2"]
    engine.abort_request("r0")
    engine.abort_request("r2")
    run_to_completion(engine)
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.finished_reasons == {"abort": 3}


def test_logprobs_match_transformers(make_engine, hf_tiny):
    prompt = random_prompts(1, seed=7)[0]
    engine = make_engine()
    engine.add_request("x", prompt, SamplingParams(max_tokens=5, logprobs=3, **GREEDY))
    logprobs = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            logprobs += output.new_logprobs
    expected_tokens, hf_logits = hf_greedy(hf_tiny, prompt, 5)
    hf_logprobs = torch.log_softmax(hf_logits, dim=-1)
    for step, lp in enumerate(logprobs):
        assert lp.token_id == expected_tokens[step]
        assert lp.logprob == pytest.approx(hf_logprobs[step, lp.token_id].item(), abs=1e-4)
        assert lp.top_token_ids == hf_logprobs[step].topk(3).indices.tolist()


def test_bad_requests_name_the_problem(make_engine):
    engine = make_engine(max_model_len=16)
    params = SamplingParams()
    engine.add_request("a", [5, 6], params)
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [5], params)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("b", [], params)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("b", list(range(3, 19)), params)
    with pytest.raises(ValueError, match="outside"):
        engine.add_request("b", [5, 512], params)
    with pytest.raises(ValueError, match="sampling_params"):
        engine.add_request("b", [5], {"temperature": 0})
    with pytest.raises(ValueError, match="max_model_len"):
        make_engine(max_model_len=4096)  # beyond the model's 2048 positions
    with pytest.raises(ValueError, match="KV pool"):
        make_engine(num_kv_blocks=3, max_model_len=64)
