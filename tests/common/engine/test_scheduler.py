"""Scheduler decisions step by step, without a model: tokens are fed back by the test.

Most tests here pin the step-at-a-time policy (enable_chunked_prefill=False: a step is all prefill or
all decode); mixed steps have their own file, test_mixed_scheduler.py. Both share the random histories.
"""

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.engine.sampling_params import SamplingParams
from common.engine.scheduler import SampledToken, Scheduler, SchedulerConfig
from common.engine.sequence import Sequence, SequenceStatus
from common.kv.block_allocator import BlockAllocator

EOS = 2


def make_scheduler(num_blocks=64, max_num_seqs=8, max_num_batched_tokens=64, block_size=4, max_model_len=64,
                   enable_chunked_prefill=False):
    config = SchedulerConfig(max_num_seqs, max_num_batched_tokens, block_size, max_model_len, enable_chunked_prefill)
    return Scheduler(config, BlockAllocator(num_blocks), frozenset({EOS}))


def make_seq(request_id, num_prompt_tokens, max_tokens=8, ignore_eos=True):
    prompt = [10 + i for i in range(num_prompt_tokens)]
    return Sequence(request_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos))


def has_work(scheduler) -> bool:
    """Sequences still queued or running, as the engine's stats count them."""
    return scheduler.num_waiting + len(scheduler.running) > 0


def run_step(scheduler, token_id=5):
    plan = scheduler.schedule()
    samples = [SampledToken(token_id, None) if sampled else None for sampled in plan.is_sampled]
    finished = scheduler.postprocess(plan, samples)
    return plan, finished


def test_new_request_joins_next_step_and_finished_leaves_at_once():
    scheduler = make_scheduler()
    scheduler.add(make_seq("a", 5, max_tokens=3))
    scheduler.add(make_seq("b", 6, max_tokens=6))
    plan, _ = run_step(scheduler)
    assert plan.is_prefill and plan.request_ids == ["a", "b"] and plan.query_lens == [5, 6]
    plan, _ = run_step(scheduler)
    assert not plan.is_prefill and plan.request_ids == ["a", "b"] and plan.query_lens == [1, 1]
    scheduler.add(make_seq("c", 3, max_tokens=4))  # arrives while a and b decode
    plan, _ = run_step(scheduler)
    assert plan.is_prefill and plan.request_ids == ["c"]
    plan, finished = run_step(scheduler)
    assert plan.request_ids == ["a", "b", "c"]
    assert [seq.request_id for seq in finished] == ["a"]  # a has its 3 tokens
    plan, _ = run_step(scheduler)
    assert plan.request_ids == ["b", "c"]  # a left at once


def test_prefill_packs_under_token_budget_and_chunks_long_prompts():
    scheduler = make_scheduler(max_num_batched_tokens=10)
    scheduler.add(make_seq("long", 23))
    scheduler.add(make_seq("short", 4))
    plans = [run_step(scheduler)[0] for _ in range(4)]
    assert [(p.request_ids, p.query_lens, p.is_sampled) for p in plans] == [
        (["long"], [10], [False]),
        (["long"], [10], [False]),
        (["long", "short"], [3, 4], [True, True]),
        (["long", "short"], [1, 1], [True, True]),
    ]
    assert scheduler.running[0].num_computed_tokens == 24  # 23 prompt + first output token


def test_max_num_seqs_caps_running():
    scheduler = make_scheduler(max_num_seqs=2)
    for name in "abc":
        scheduler.add(make_seq(name, 3, max_tokens=2))
    plan, _ = run_step(scheduler)
    assert plan.request_ids == ["a", "b"] and [s.request_id for s in scheduler.waiting] == ["c"]
    plan, finished = run_step(scheduler)
    assert plan.request_ids == ["a", "b"] and len(finished) == 2
    plan, _ = run_step(scheduler)
    assert plan.request_ids == ["c"]


def test_preemption_frees_newest_and_recomputes_later():
    # 4 blocks of 4 tokens: two sequences of 7 tokens need 2 blocks each; the 9th token needs a third.
    scheduler = make_scheduler(num_blocks=4, block_size=4)
    scheduler.add(make_seq("a", 7, max_tokens=6))
    scheduler.add(make_seq("b", 7, max_tokens=6))
    run_step(scheduler)  # prefill both: 8 tokens each after sampling
    plan, _ = run_step(scheduler)  # token 8 fits in block 2; samples token 9
    assert plan.request_ids == ["a", "b"] and scheduler.num_preemptions == 0
    plan, _ = run_step(scheduler)  # a needs a 3rd block: b is preempted
    assert plan.request_ids == ["a"] and plan.preempted_request_ids == ["b"]
    assert scheduler.num_preemptions == 1
    b = scheduler.waiting[0]
    assert b.block_table == [] and b.num_computed_tokens == 0 and b.num_tokens == 9
    while scheduler.running:
        plan, _ = run_step(scheduler)
    plan, _ = run_step(scheduler)  # b comes back: prompt + its 2 outputs in one prefill
    assert plan.is_prefill and plan.request_ids == ["b"] and plan.query_lens == [9]


def _handed_off(scheduler, request_id, num_prompt_tokens, max_tokens=8):
    seq = make_seq(request_id, num_prompt_tokens, max_tokens=max_tokens)
    seq.block_table = scheduler.allocator.allocate(seq.num_blocks_needed(num_prompt_tokens, 4))
    seq.num_computed_tokens = num_prompt_tokens
    seq.append_token(5)
    scheduler.add_prefilled(seq)
    return seq


def test_handoff_joins_running_or_waits_when_full():
    scheduler = make_scheduler(max_num_seqs=1)
    first, second = _handed_off(scheduler, "a", 5), _handed_off(scheduler, "b", 5)
    plan, _ = run_step(scheduler)
    assert not plan.is_prefill and plan.request_ids == ["a"] and plan.query_lens == [1]
    assert list(scheduler.running) == [first] and list(scheduler.prefilled) == [second]
    assert not scheduler.waiting and scheduler.num_waiting == 1


def test_handoff_that_waited_for_a_slot_decodes_without_a_prefill_step():
    scheduler = make_scheduler(max_num_seqs=2)
    _handed_off(scheduler, "a", 5, max_tokens=3)
    _handed_off(scheduler, "b", 6, max_tokens=8)
    _handed_off(scheduler, "c", 7, max_tokens=8)  # running is full: c waits with its blocks
    plans = []
    while has_work(scheduler):
        plans.append(run_step(scheduler)[0])
    assert not any(plan.is_prefill for plan in plans)
    assert plans[2].request_ids == ["b", "c"]  # a finished its 3 tokens in step 2; c took its slot at once
    assert scheduler.allocator.usage == 0.0


def test_prefill_of_new_prompts_comes_before_waiting_handoffs():
    scheduler = make_scheduler(max_num_seqs=2)
    _handed_off(scheduler, "a", 5)
    _handed_off(scheduler, "b", 5)
    _handed_off(scheduler, "c", 5)
    run_step(scheduler)
    scheduler.abort(scheduler.running[0])
    scheduler.add(make_seq("p", 4))
    plan, _ = run_step(scheduler)
    assert plan.is_prefill and plan.request_ids == ["p"]  # "c" still waits, holding its blocks
    assert [seq.request_id for seq in scheduler.prefilled] == ["c"]


def test_abort_frees_blocks_from_any_queue():
    scheduler = make_scheduler(num_blocks=8)
    a, b = make_seq("a", 5), make_seq("b", 5)
    scheduler.add(a)
    run_step(scheduler)
    scheduler.add(b)
    scheduler.abort(a)
    scheduler.abort(b)
    assert scheduler.allocator.num_free_blocks == 8 and not has_work(scheduler)
    assert a.finish_reason == "abort" and a.status == SequenceStatus.FINISHED


@pytest.mark.parametrize("enable_chunked_prefill", [False, True])
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    num_blocks=st.integers(6, 20),
    block_size=st.sampled_from([1, 2, 4]),
    budget=st.integers(8, 24),
)
def test_random_histories_never_leak_or_share_blocks(enable_chunked_prefill, seed, num_blocks, block_size, budget):
    rng = random.Random(seed)
    max_model_len = min(24, num_blocks * block_size)
    scheduler = make_scheduler(num_blocks, 4, budget, block_size, max_model_len, enable_chunked_prefill)
    live: list[Sequence] = []
    for step in range(60):
        action = rng.random()
        if action < 0.3 and step < 40:
            seq = make_seq(f"r{step}", rng.randint(1, max_model_len - 1), max_tokens=rng.randint(1, 10),
                           ignore_eos=rng.random() < 0.5)
            scheduler.add(seq)
            live.append(seq)
        elif action < 0.35 and live:
            scheduler.abort(live.pop(rng.randrange(len(live))))
        elif action < 0.45 and step < 40:  # a KV hand-off: prompt KV arrives in reserved blocks
            seq = make_seq(f"h{step}", rng.randint(1, max_model_len - 2), max_tokens=rng.randint(2, 10))
            num_blocks = seq.num_blocks_needed(seq.num_tokens, block_size)
            if scheduler.allocator.can_allocate(num_blocks):
                seq.block_table = scheduler.allocator.allocate(num_blocks)
                seq.num_computed_tokens = seq.num_tokens
                seq.append_token(5)
                scheduler.add_prefilled(seq)
                live.append(seq)
        plan = scheduler.schedule()
        samples = [SampledToken(rng.choice([5, 6, EOS]), None) if s else None for s in plan.is_sampled]
        for seq in scheduler.postprocess(plan, samples):
            live.remove(seq)
        owned = [b for seq in live for b in seq.block_table]
        assert len(owned) == len(set(owned)), "a block is held by two sequences"
        assert scheduler.allocator.num_used_blocks == len(owned), "leaked blocks"
        for seq in scheduler.running:
            assert seq.num_computed_tokens == seq.num_tokens - 1
        for seq in live:
            assert len(seq.block_table) * block_size >= seq.num_computed_tokens
            assert seq.num_computed_tokens > 0 or not seq.block_table
    for _ in range(500):
        if not has_work(scheduler):
            break
        run_step(scheduler)
    assert not has_work(scheduler) and scheduler.allocator.usage == 0.0
