"""Automatic prefix caching in the engine: identical outputs, only suffixes computed, blocks shared safely.

Each comparison runs the same requests with caching off and on (and both scheduling modes): greedy
tokens must match exactly, and every block must come back once all requests have ended.
"""

import argparse
import random

import pytest

from common.engine.args import add_engine_args, engine_config_from_args
from common.engine.config import EngineConfig
from common.engine.sampling_params import SamplingParams
from tests.common.engine.engine_helpers import run_to_completion

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def shared_prefix_requests(num_requests, prefix_len=37, seed=0, max_tokens=8):
    """Requests that share a long 'system prompt' and differ in their suffixes (some share those too)."""
    rng = random.Random(seed)
    system = [rng.randrange(3, 512) for _ in range(prefix_len)]
    suffixes = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 11))] for _ in range(num_requests // 2 + 1)]
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [(f"r{i}", system + suffixes[i % len(suffixes)] + [3 + i], params) for i in range(num_requests)]


def check_holders_match_ref_counts(engine):
    """Every block a live request holds has exactly as many holders as its reference count, and none
    of them is free: shared blocks are never handed out while referenced."""
    holders: dict[int, int] = {}
    for seq in list(engine._requests.values()) + list(engine._held.values()):
        for block_id in seq.block_table:
            holders[block_id] = holders.get(block_id, 0) + 1
    for reservation in engine._reserved.values():
        for block_id in reservation.block_ids:
            holders[block_id] = holders.get(block_id, 0) + 1
    allocator = engine.allocator
    for block_id in range(allocator.num_blocks):
        assert allocator.ref_count(block_id) == holders.get(block_id, 0), block_id
    free = set(allocator._free_block_ids) | set(allocator._cached_free)
    assert not free & set(holders)


def run_staggered(engine, requests, per_step=2, abort_at=None):
    """Adds `per_step` requests before each step; optionally aborts one request at a step. Checks the
    holders after every step; returns {request_id: tokens}."""
    tokens: dict[str, list[int]] = {}
    pending = list(requests)
    for step in range(10_000):
        for request_id, prompt, params in pending[:per_step]:
            engine.add_request(request_id, prompt, params)
        del pending[:per_step]
        if abort_at is not None and step == abort_at[0]:
            engine.abort_request(abort_at[1])
        if not pending and not engine.has_unfinished_requests():
            return tokens
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        check_holders_match_ref_counts(engine)
    raise AssertionError("engine did not finish")


def check_all_blocks_come_back(engine):
    allocator = engine.allocator
    assert engine.stats().kv_cache_usage == 0 and allocator.num_fenced_blocks == 0
    assert all(allocator.ref_count(b) == 0 for b in range(allocator.num_blocks))
    assert sorted(allocator.allocate(allocator.num_blocks)) == list(range(allocator.num_blocks))


@pytest.mark.parametrize("is_async", [False, True])
def test_greedy_outputs_are_identical_with_caching_on_and_off(make_engine, is_async):
    requests = shared_prefix_requests(12, seed=1)
    results = {}
    for caching in (False, True):
        engine = make_engine(enable_prefix_caching=caching, async_scheduling=is_async)
        results[caching] = run_staggered(engine, requests)
        stats = engine.stats()
        if caching:
            assert stats.prefix_cache_hits_tokens >= 10 * 36  # every request after the first two hits
            assert stats.prefix_cache_queries_tokens == sum(len(p) for _, p, _ in requests)
        else:
            assert stats.prefix_cache_queries_tokens == stats.prefix_cache_hits_tokens == 0
        check_all_blocks_come_back(engine)
    assert results[True] == results[False]
    assert all(len(t) == 8 for t in results[True].values())


def recording_plans(engine):
    plans = []
    schedule = engine.scheduler.schedule

    def record():
        plan = schedule()
        plans.append(plan)
        return plan

    engine.scheduler.schedule = record
    return plans


def test_a_second_request_with_the_same_prefix_computes_only_its_suffix(make_engine):
    # step at a time: every prefill is a plan of its own (mixed steps: test_mixed_steps.py)
    engine = make_engine(enable_prefix_caching=True, block_size=4, enable_chunked_prefill=False)
    plans = recording_plans(engine)
    first = list(range(10, 30))  # 20 tokens: 5 full blocks
    engine.add_request("a", first, GREEDY)
    tokens, _ = run_to_completion(engine)
    assert plans[0].num_batched_tokens == 20
    del plans[:]
    engine.add_request("b", first[:16] + [7, 8, 9, 11, 12], GREEDY)  # 4 blocks shared, then its own
    engine.step()
    assert plans[0].is_prefill and plans[0].num_batched_tokens == 5
    assert engine.stats().prefix_cache_hits_tokens == 16
    del plans[:]
    engine.add_request("c", list(first), GREEDY)  # the whole prompt cached: its last token is computed
    firsts = [o.new_token_ids for o in engine.step() if o.request_id == "c"]
    assert plans[0].is_prefill and plans[0].num_batched_tokens == 4  # the last block, (20 - 1) // 4 = 4 hit
    more, _ = run_to_completion(engine)
    assert firsts[0] + more["c"] == tokens["a"]
    # a follow-up turn: the prompt with its own output, whose blocks decoding filled, is cached too
    del plans[:]
    engine.add_request("d", first + tokens["a"] + [5], GREEDY)  # 29 tokens
    engine.step()
    # "a" wrote KV for its 20 + 7 first tokens (not for its last output): 6 full blocks, 24 tokens
    assert plans[0].num_batched_tokens == 29 - 24
    run_to_completion(engine)
    check_all_blocks_come_back(engine)


def test_outputs_match_a_fresh_engine_for_a_cached_prefix(make_engine):
    prompt = list(range(40, 75))
    fresh = make_engine()
    fresh.add_request("x", prompt, GREEDY)
    expected, _ = run_to_completion(fresh)
    engine = make_engine(enable_prefix_caching=True)
    engine.add_request("warm", prompt[:30] + [1, 2, 3], GREEDY)
    run_to_completion(engine)
    engine.add_request("x", prompt, GREEDY)
    tokens, _ = run_to_completion(engine)
    assert tokens == expected and engine.stats().prefix_cache_hits_tokens == 28


@pytest.mark.parametrize("is_async", [False, True])
def test_shared_blocks_survive_eviction_pressure_preemption_and_aborts(make_engine, is_async):
    requests = shared_prefix_requests(14, prefix_len=21, seed=2, max_tokens=20)
    results = {}
    for caching in (False, True):
        engine = make_engine(enable_prefix_caching=caching, async_scheduling=is_async, num_kv_blocks=30,
                             max_model_len=64)
        results[caching] = run_staggered(engine, requests, per_step=3, abort_at=(9, "r4"))
        if caching:
            assert engine.stats().num_preemptions > 0 and engine.stats().prefix_cache_hits_tokens > 0
            assert engine.prefix_cache.num_evicted_blocks > 0
        check_all_blocks_come_back(engine)
        results[caching].pop("r4", None)  # aborted: how far it got depends on when it started
    assert results[True] == results[False]


def test_prefill_worker_shares_cached_blocks_and_the_decode_side_reuses_what_it_holds(make_engine):
    requests = shared_prefix_requests(4, seed=3)
    results = {}
    for caching in (False, True):
        prefill = make_engine(enable_prefix_caching=caching, seed=1)
        decode = make_engine(enable_prefix_caching=caching, seed=2)
        for request_id, prompt, params in requests:
            prefill.add_prefill_request(request_id, prompt, params)
            run_to_completion(prefill)  # one at a time: later ones hit the earlier ones' blocks
        firsts = {rid: seq for rid, seq in prefill._held.items()}
        if caching:
            assert prefill.stats().prefix_cache_hits_tokens >= 3 * 36
            shared = set(firsts["r0"].block_table) & set(firsts["r1"].block_table)
            assert len(shared) == 9 and all(prefill.allocator.ref_count(b) >= 2 for b in shared)
        for request_id, prompt, params in requests:
            reservation = decode.reserve_kv(request_id, prompt)
            sent = firsts[request_id].block_table[reservation.num_reused_blocks:]  # only what decode lacks
            decode.kv_pool.scatter_blocks(reservation.pulled_block_ids, prefill.kv_pool.gather_blocks(sent))
            first_token = firsts[request_id].token_ids[-1]
            prefill.release_kv(request_id)
            decode.add_decode_request(request_id, prompt, first_token, params, reservation.block_ids)
            check_holders_match_ref_counts(decode)
        tokens, _ = run_to_completion(decode)
        results[caching] = {rid: [firsts[rid].token_ids[-1]] + t for rid, t in tokens.items()}
        stats = decode.stats()
        if caching:  # r1..r3 reuse the 9 full blocks of the shared 37-token prefix r0 brought
            assert stats.prefix_cache_hits_tokens == 3 * 36
            assert stats.prefix_cache_queries_tokens == sum(len(p) for _, p, _ in requests)
        else:
            assert stats.prefix_cache_queries_tokens == stats.prefix_cache_hits_tokens == 0
        check_all_blocks_come_back(prefill)
        check_all_blocks_come_back(decode)
    assert results[True] == results[False]


def test_flag_and_config():
    parser = add_engine_args(argparse.ArgumentParser())
    assert engine_config_from_args(parser.parse_args(["--enable-prefix-caching"])).enable_prefix_caching
    assert not engine_config_from_args(parser.parse_args(["--no-enable-prefix-caching"])).enable_prefix_caching
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        EngineConfig(enable_prefix_caching=1)
