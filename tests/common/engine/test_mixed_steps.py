"""Mixed steps through the engine and the model: the same tokens as the step-at-a-time engine, and
running decodes that keep getting a token every step while a long prompt is chunked beside them."""

import random

import pytest

from common.engine.sampling_params import SamplingParams
from tests.common.engine.test_async_scheduling import run_recording, tokens_of
from tests.common.engine.test_cuda_graphs import build_engine
from tests.common.engine.test_prefix_caching import check_all_blocks_come_back
from tests.helpers.devices import DEVICES

STEP_AT_A_TIME = dict(enable_chunked_prefill=False, async_scheduling=False)


def record_steps(engine, launched=None):
    """Wraps the model runner: every plan it runs or launches, in order; `launched` gets (plan, whether it
    was launched while another step was in flight) for each launched one."""
    plans = []
    launched = [] if launched is None else launched
    runner = engine.model_runner
    run, launch = runner.run, runner.launch
    runner.run = lambda plan: plans.append(plan) or run(plan)
    runner.launch = lambda plan, previous: plans.append(plan) or launched.append((plan, previous is not None)) \
        or launch(plan, previous)
    return plans


def varied_requests(num_requests, seed):
    """Prompts of 3..90 tokens (many longer than the step budget), some sharing a 24-token prefix; greedy
    rows, seeded sampled rows, and a few rows that need their tokens on the host (logprobs, penalties)."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 512) for _ in range(24)]
    requests = []
    for i in range(num_requests):
        prompt = [rng.randrange(3, 512) for _ in range(rng.randint(3, 66))]
        if i % 3 == 0:
            prompt = shared + prompt
        kind = i % 7
        if kind == 5:
            params = SamplingParams(temperature=0.8, top_k=40, seed=100 + i, max_tokens=rng.randint(1, 20))
        elif kind == 6:
            params = SamplingParams(temperature=0, logprobs=2, repetition_penalty=1.2, max_tokens=rng.randint(1, 12))
        else:
            params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=True)
        requests.append((f"r{i}", prompt, params))
    return requests


def staggered(requests, rng):
    arrivals: dict[int, list] = {}
    step = 0
    for request in requests:
        step += rng.choice([0, 0, 1, 3])
        arrivals.setdefault(step, []).append(request)
    return arrivals


@pytest.mark.parametrize("is_async", [True, False], ids=["async", "waiting"])
@pytest.mark.parametrize("num_kv_blocks", [128, 40], ids=["roomy", "preempting"])
def test_mixed_steps_give_the_same_tokens_as_the_step_at_a_time_engine(make_engine, is_async, num_kv_blocks):
    arrivals = staggered(varied_requests(24, seed=num_kv_blocks), random.Random(1))
    config = dict(num_kv_blocks=num_kv_blocks, max_model_len=128, max_num_batched_tokens=32, max_num_seqs=12,
                  enable_prefix_caching=True)
    expected_engine = make_engine(**STEP_AT_A_TIME, **config)
    expected = run_recording(expected_engine, arrivals)
    engine = make_engine(enable_chunked_prefill=True, async_scheduling=is_async, **config)
    launched = []
    plans = record_steps(engine, launched)
    mixed = run_recording(engine, arrivals)
    assert tokens_of(mixed) == tokens_of(expected)
    assert mixed == expected  # outputs one by one: finish reasons, counts, logprobs present
    check_all_blocks_come_back(engine)
    stats = engine.stats()
    assert stats.prefix_cache_hits_tokens > 0
    assert (stats.num_preemptions > 0) == (num_kv_blocks == 40)  # the small pool preempts
    mixed_plans = [plan for plan in plans if plan.is_mixed]
    assert len(mixed_plans) >= 10
    assert any(not all(plan.is_sampled) for plan in mixed_plans)  # decodes beside a prompt's middle chunk
    assert all(plan.num_batched_tokens <= 32 for plan in plans)
    if is_async:  # mixed steps went without waiting for their tokens, and so did prompt chunks after them
        assert sum(plan.is_mixed for plan, _ in launched) >= 5
        assert sum(plan.is_mixed and is_ahead for plan, is_ahead in launched) >= 3  # read tokens in flight
    else:
        assert not launched


@pytest.mark.parametrize("is_async", [True, False], ids=["async", "waiting"])
def test_a_long_prompt_does_not_delay_running_decodes(make_engine, is_async):
    budget = 16
    engine = make_engine(enable_chunked_prefill=True, async_scheduling=is_async, max_num_batched_tokens=budget,
                         max_num_seqs=8)
    plans = record_steps(engine)
    rng = random.Random(5)
    decoding = ["a", "b", "c"]
    for request_id in decoding:
        prompt = [rng.randrange(3, 512) for _ in range(6)]
        engine.add_request(request_id, prompt, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    while not all(engine._requests[r].num_output_tokens >= 2 for r in decoding):
        engine.step()
    long_prompt = [rng.randrange(3, 512) for _ in range(100)]
    engine.add_request("long", long_prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    num_chunk_steps = -(-len(long_prompt) // (budget - len(decoding)))  # 13 tokens beside 3 decodes
    first_plan = len(plans)
    for _ in range(num_chunk_steps + 1):
        outputs = engine.step()
        tokens_per_request = {o.request_id: len(o.new_token_ids) for o in outputs}
        assert all(tokens_per_request.get(r) == 1 for r in decoding), tokens_per_request  # a token each, every step
    chunk_plans = [plan for plan in plans[first_plan:] if "long" in plan.request_ids][:num_chunk_steps]
    assert [plan.query_lens[-1] for plan in chunk_plans] == [13] * 7 + [9]
    assert all(plan.request_ids == decoding + ["long"] for plan in chunk_plans)
    assert chunk_plans[-1].is_sampled[-1] and not any(plan.is_sampled[-1] for plan in chunk_plans[:-1])


def test_step_at_a_time_engine_stalls_decodes_while_a_prompt_is_prefilled(make_engine):
    engine = make_engine(**STEP_AT_A_TIME, max_num_batched_tokens=16, max_num_seqs=8)
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=60, ignore_eos=True))
    engine.step()
    engine.add_request("long", list(range(3, 103)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    got_a_token = [any(o.request_id == "a" for o in engine.step()) for _ in range(8)]
    assert got_a_token == [False] * 7 + [True]  # 100 tokens at 16 a step: a waits seven steps, then decodes


def test_abort_of_a_prompt_whose_chunk_is_in_flight_frees_everything(make_engine):
    engine = make_engine(enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=8)
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()
    engine.add_request("long", list(range(3, 103)), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.step()
    engine.step()  # a chunk of "long" is in flight
    assert engine._in_flight is not None and "long" in engine._in_flight.plan.request_ids
    engine.abort_request("long")
    assert engine.allocator.num_fenced_blocks > 0  # the step in flight may still write its blocks
    tokens, reasons = {}, {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
            if output.finished:
                reasons[output.request_id] = output.finish_reason
    assert reasons == {"long": "abort", "a": "length"} and tokens["long"] == []  # only its final output
    check_all_blocks_come_back(engine)
    alone = make_engine(**STEP_AT_A_TIME)
    alone.add_request("a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    expected = run_recording(alone, {})
    assert len(tokens["a"]) + 2 == 20  # its first two tokens came out before the abort
    assert tokens_of(expected)["a"][2:] == tokens["a"]


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_steps_on_triton_kernels_beside_decode_graphs(tiny_folder, device, monkeypatch):
    """The Triton path (interpreter on CPU, compiled on CUDA): mixed steps split between the decode and
    prefill kernels, decode-only steps through the graph runner (captured on CUDA), launched
    asynchronously; the same greedy tokens as the step-at-a-time reference engine."""
    if device == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    rng = random.Random(9)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (12, 9, 14, 4, 6)]
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (5, 17, 3, 150, 40)]
    requests = [(f"r{i}", prompt, p) for i, (prompt, p) in enumerate(zip(prompts, params))]
    arrivals = {0: requests[:3], 3: requests[3:]}  # a 150-token prompt arrives while three decode
    settings = dict(max_num_batched_tokens=48, max_num_seqs=8, num_kv_blocks=64, max_model_len=256)
    reference = build_engine(tiny_folder, device, "reference", enable_chunked_prefill=False,
                             async_scheduling=False, **settings)
    engine = build_engine(tiny_folder, device, "graphs", attention_backend="triton", **settings)
    launched = []
    plans = record_steps(engine, launched)
    assert tokens_of(run_recording(engine, arrivals)) == tokens_of(run_recording(reference, arrivals))
    assert sum(plan.is_mixed for plan, _ in launched) >= 3 and any(not plan.is_prefill for plan in plans)
    check_all_blocks_come_back(engine)
