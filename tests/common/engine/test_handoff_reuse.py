"""Decode-side prefix reuse across the KV hand-off, engine to engine (the services move the same blocks).

A decode engine that decoded an earlier turn of a conversation still holds that turn's prompt and
output blocks in its prefix cache: `reserve_kv` forks them and only the rest is moved from the prefill
engine. Greedy tokens must equal an engine without caching; shared blocks are never freed, evicted or
written while referenced; every block comes back when the requests end.
"""

import random

import pytest

from common.engine.sampling_params import SamplingParams
from common.kv import OutOfKVBlocks
from common.kv.block_hash import full_block_hashes
from tests.common.engine.engine_helpers import run_to_completion
from tests.common.engine.test_prefix_caching import check_all_blocks_come_back, check_holders_match_ref_counts

BLOCK_SIZE = 4  # make_engine's
GREEDY = SamplingParams(temperature=0, max_tokens=9, ignore_eos=True)


def prefill_first(prefill, request_id, prompt, params):
    """Runs a prefill-only request; returns its token #1 and held block ids."""
    prefill.add_prefill_request(request_id, prompt, params)
    while True:
        for output in prefill.step():
            if output.request_id == request_id:
                return output.new_token_ids[0], output.kv_block_ids


def move_kv(prefill, decode, request_id, prompt, prefill_block_ids):
    """What the services do: reserve (reusing cached blocks), move only the blocks decode lacks."""
    reservation = decode.reserve_kv(request_id, prompt, prefill.held_block_hashes(request_id))
    sent = prefill_block_ids[reservation.num_reused_blocks:]
    decode.kv_pool.scatter_blocks(reservation.pulled_block_ids, prefill.kv_pool.gather_blocks(sent))
    prefill.release_kv(request_id)
    return reservation


def hand_off(prefill, decode, request_id, prompt, params):
    """Prefill on one engine, decode on the other; returns (token #1, reservation)."""
    first_token, prefill_block_ids = prefill_first(prefill, request_id, prompt, params)
    reservation = move_kv(prefill, decode, request_id, prompt, prefill_block_ids)
    decode.add_decode_request(request_id, prompt, first_token, params, reservation.block_ids)
    return first_token, reservation


def reference_tokens(make_engine, prompt, params=GREEDY):
    engine = make_engine(enable_prefix_caching=False)
    engine.add_request("x", prompt, params)
    tokens, _ = run_to_completion(engine)
    return tokens["x"]


def prompt_of(length, seed):
    rng = random.Random(seed)
    return [rng.randrange(3, 512) for _ in range(length)]


@pytest.mark.parametrize("is_async", [False, True])
def test_a_second_turn_reuses_the_prompt_and_output_blocks_the_first_left_on_the_decode_side(make_engine, is_async):
    prefill = make_engine(enable_prefix_caching=True, seed=1)
    decode = make_engine(enable_prefix_caching=True, seed=2, async_scheduling=is_async)
    turn1 = prompt_of(30, seed=5)
    first, reservation = hand_off(prefill, decode, "t1", turn1, GREEDY)
    assert reservation.num_reused_blocks == 0 and reservation.num_pulled_blocks == -(-30 // BLOCK_SIZE)
    rest, _ = run_to_completion(decode)
    answer1 = [first] + rest["t1"]
    assert answer1 == reference_tokens(make_engine, turn1)

    turn2 = turn1 + answer1 + prompt_of(6, seed=6)  # 45 tokens
    prefill_hits_before = prefill.stats().prefix_cache_hits_tokens
    first, reservation = hand_off(prefill, decode, "t2", turn2, GREEDY)
    # Decode wrote KV for the prompt and every output token but the last: its full blocks are reused.
    num_with_kv = len(turn1) + len(answer1) - 1
    assert reservation.num_reused_blocks == num_with_kv // BLOCK_SIZE == 9
    assert reservation.num_pulled_blocks == -(-len(turn2) // BLOCK_SIZE) - 9
    assert reservation.num_cached_tokens == 36
    # The prefill engine had turn 1's prompt blocks only: it computed the answer and the new tokens.
    assert prefill.stats().prefix_cache_hits_tokens - prefill_hits_before == (len(turn1) // BLOCK_SIZE) * BLOCK_SIZE
    check_holders_match_ref_counts(decode)
    rest, _ = run_to_completion(decode)
    assert [first] + rest["t2"] == reference_tokens(make_engine, turn2)
    assert decode.stats().prefix_cache_hits_tokens == 36
    assert decode.stats().prefix_cache_queries_tokens == len(turn1) + len(turn2)
    check_all_blocks_come_back(prefill)
    check_all_blocks_come_back(decode)


def test_reused_blocks_are_never_evicted_or_overwritten_while_the_rest_is_in_flight(make_engine):
    prefill = make_engine(enable_prefix_caching=True, seed=1)
    decode = make_engine(enable_prefix_caching=True, seed=2, num_kv_blocks=32, max_model_len=64)
    turn1, other = prompt_of(22, seed=7), prompt_of(17, seed=8)
    for request_id, prompt in (("other", other), ("t1", turn1)):  # both leave cached blocks behind
        hand_off(prefill, decode, request_id, prompt, GREEDY)
    tokens, _ = run_to_completion(decode)
    turn2 = turn1 + tokens["t1"][:-1] + prompt_of(5, seed=9)  # turn 1's answer minus token #1 (not streamed here)
    first, prefill_block_ids = prefill_first(prefill, "t2", turn2, GREEDY)
    reservation = decode.reserve_kv("t2", turn2, prefill.held_block_hashes("t2"))  # its pull is "in flight"
    reused = reservation.block_ids[:reservation.num_reused_blocks]
    assert len(reused) >= 5
    kept_kv = decode.kv_pool.gather_blocks(reused).clone()

    hogs = []  # other hand-offs take every other block, evicting the cached-free ones, and write theirs
    while True:
        hog_prompt = prompt_of(12, seed=100 + len(hogs))
        try:
            hog = decode.reserve_kv(f"hog{len(hogs)}", hog_prompt)
        except OutOfKVBlocks:
            break
        hogs.append(hog)
        decode.kv_pool.scatter_blocks(hog.pulled_block_ids, prefill.kv_pool.kv[:, :, :hog.num_pulled_blocks] + 1)
    assert decode.allocator.num_free_blocks < 3 and decode.prefix_cache.num_evicted_blocks > 0
    assert not set(reused) & {block_id for hog in hogs for block_id in hog.block_ids}
    assert all(decode.allocator.ref_count(block_id) == 1 for block_id in reused)
    assert decode.prefix_cache.lookup(reservation.block_hashes[:len(reused)]) == reused  # still findable
    assert decode.kv_pool.gather_blocks(reused).equal(kept_kv)
    check_holders_match_ref_counts(decode)

    for index in range(len(hogs)):
        decode.abort_request(f"hog{index}")
    sent = prefill_block_ids[reservation.num_reused_blocks:]
    decode.kv_pool.scatter_blocks(reservation.pulled_block_ids, prefill.kv_pool.gather_blocks(sent))
    prefill.release_kv("t2")
    decode.add_decode_request("t2", turn2, first, GREEDY, reservation.block_ids)
    rest, _ = run_to_completion(decode)
    assert [first] + rest["t2"] == reference_tokens(make_engine, turn2)
    check_all_blocks_come_back(prefill)
    check_all_blocks_come_back(decode)


def test_an_aborted_reservation_returns_every_block_and_keeps_the_cached_ones_findable(make_engine):
    prefill = make_engine(enable_prefix_caching=True, seed=1)
    decode = make_engine(enable_prefix_caching=True, seed=2)
    turn1 = prompt_of(26, seed=10)
    hand_off(prefill, decode, "t1", turn1, GREEDY)
    run_to_completion(decode)
    num_cached, num_free = decode.prefix_cache.num_cached_blocks, decode.allocator.num_free_blocks
    assert num_free == decode.allocator.num_blocks
    turn2 = turn1 + prompt_of(9, seed=11)
    reservation = decode.reserve_kv("t2", turn2)
    assert reservation.num_reused_blocks == 26 // BLOCK_SIZE
    assert decode.allocator.num_free_blocks == num_free - len(reservation.block_ids)
    decode.abort_request("t2")  # e.g. the client went away while the pull was in flight
    decode.abort_request("t2")  # idempotent
    assert decode.allocator.num_free_blocks == num_free
    assert all(decode.allocator.ref_count(b) == 0 for b in range(decode.allocator.num_blocks))
    assert decode.prefix_cache.num_cached_blocks == num_cached  # pulled blocks never joined the cache
    again = decode.reserve_kv("t2", turn2)  # the reused blocks are still there for a retry
    assert again.block_ids[:again.num_reused_blocks] == reservation.block_ids[:reservation.num_reused_blocks]
    decode.abort_request("t2")
    check_all_blocks_come_back(decode)


@pytest.mark.parametrize("is_async", [False, True])
def test_concurrent_handoffs_sharing_blocks_match_no_caching_under_eviction_and_preemption(make_engine, is_async):
    rng = random.Random(12)
    system = prompt_of(23, seed=13)
    requests = [(f"r{i}", system + [rng.randrange(3, 512) for _ in range(rng.randint(1, 9))],
                 SamplingParams(temperature=0, max_tokens=rng.randint(8, 20), ignore_eos=True)) for i in range(12)]
    results = {}
    for caching in (False, True):
        prefill = make_engine(enable_prefix_caching=caching, seed=1)
        decode = make_engine(enable_prefix_caching=caching, seed=2, async_scheduling=is_async, num_kv_blocks=36,
                             max_model_len=64)
        tokens: dict[str, list[int]] = {}
        pending = list(requests)
        prefilled = []  # (request id, prompt, params, token #1, prefill block ids) waiting for decode blocks
        is_aborted = False
        for _ in range(10_000):
            for request_id, prompt, params in pending[:2]:  # two prompts are prefilled every step
                prefilled.append((request_id, prompt, params, *prefill_first(prefill, request_id, prompt, params)))
            del pending[:2]
            while prefilled:  # hand-offs join in order while decode has blocks (the worker retries likewise)
                request_id, prompt, params, first, prefill_block_ids = prefilled[0]
                try:
                    reservation = move_kv(prefill, decode, request_id, prompt, prefill_block_ids)
                except OutOfKVBlocks:
                    break
                prefilled.pop(0)
                decode.add_decode_request(request_id, prompt, first, params, reservation.block_ids)
                tokens[request_id] = [first]
            if "r5" in tokens and not is_aborted:
                decode.abort_request("r5")  # running, its blocks shared with the others
                is_aborted = True
            if not pending and not prefilled and not decode.has_unfinished_requests():
                break
            for output in decode.step():
                tokens[output.request_id].extend(output.new_token_ids)
            check_holders_match_ref_counts(decode)
        stats = decode.stats()
        if caching:
            assert stats.prefix_cache_hits_tokens >= 8 * 20  # most hand-offs reused the shared blocks
            assert stats.num_preemptions > 0 and decode.prefix_cache.num_evicted_blocks > 0
        else:
            assert stats.prefix_cache_queries_tokens == 0
        check_all_blocks_come_back(prefill)
        check_all_blocks_come_back(decode)
        tokens.pop("r5")
        results[caching] = tokens
    assert results[True] == results[False]
    for request_id, prompt, params in requests:
        if request_id != "r5":
            assert len(results[True][request_id]) == params.max_tokens


def test_without_prefix_caching_a_decode_engine_reuses_nothing(make_engine):
    prefill = make_engine(enable_prefix_caching=False, seed=1)
    decode = make_engine(enable_prefix_caching=False, seed=2)
    turn1 = prompt_of(21, seed=14)
    hand_off(prefill, decode, "t1", turn1, GREEDY)
    run_to_completion(decode)
    _, reservation = hand_off(prefill, decode, "t2", turn1 + [7, 8, 9], GREEDY)
    assert reservation.num_reused_blocks == 0 and reservation.num_pulled_blocks == -(-24 // BLOCK_SIZE)
    run_to_completion(decode)
    assert decode.stats().prefix_cache_queries_tokens == 0
    check_all_blocks_come_back(decode)


@pytest.mark.parametrize("caching", [False, True])
def test_held_block_hashes_are_the_prompts_full_blocks(make_engine, caching):
    prefill = make_engine(enable_prefix_caching=caching)
    prompt = prompt_of(19, seed=15)
    prefill_first(prefill, "a", prompt, GREEDY)
    assert prefill.held_block_hashes("a") == full_block_hashes(prompt, BLOCK_SIZE)
    assert len(prefill.held_block_hashes("a")) == 4
    prefill.release_kv("a")
    with pytest.raises(ValueError, match="holds no KV blocks"):
        prefill.held_block_hashes("a")
