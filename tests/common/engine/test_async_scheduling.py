"""Asynchronous scheduling: decode step N+1 launched before step N's tokens reach the host.

Every test runs the same requests through an engine that waits for each step's tokens
(async_scheduling=False) and one that does not, and checks that what comes out is identical:
tokens, finish reasons, output counts, stats, and that every block comes back. The comparisons run
under both scheduling policies: mixed steps (launched too) and step at a time (decode steps only).
"""

import random

import pytest

from common.engine.sampling_params import SamplingParams
from common.kv.block_allocator import BlockAllocator
from tests.common.engine.engine_helpers import run_to_completion


def random_prompts(num_prompts, min_len=3, max_len=20, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randint(min_len, max_len))] for _ in range(num_prompts)]


def run_recording(engine, arrivals, max_steps=10_000):
    """Adds arrivals[k] before step k and steps until idle; returns every output as a tuple, per request."""
    outputs: dict[str, list[tuple]] = {}
    for step in range(max_steps):
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
        if step > max(arrivals, default=0) and not engine.has_unfinished_requests():
            return outputs
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(
                (tuple(output.new_token_ids), output.finished, output.finish_reason, output.num_output_tokens,
                 output.new_logprobs is not None))
    raise AssertionError("engine did not finish")


def tokens_of(recorded):
    return {rid: [t for out in outs for t in out[0]] for rid, outs in recorded.items()}


def both_modes(make_engine, arrivals, **config):
    """The recorded outputs of the waiting engine and the asynchronous one (checked idle afterwards)."""
    results = []
    for is_async in (False, True):
        engine = make_engine(async_scheduling=is_async, **config)
        results.append(run_recording(engine, arrivals))
        stats = engine.stats()
        assert stats.kv_cache_usage == 0 and stats.num_running == 0 and stats.num_waiting == 0
        assert engine.allocator.num_fenced_blocks == 0 and engine._in_flight is None
        results.append(stats)
    return results


@pytest.fixture(params=[True, False], ids=["mixed", "step-at-a-time"])
def enable_chunked_prefill(request):
    return request.param


def stop_token_of(make_engine, prompt, index):
    """The greedy token at output position `index` of `prompt`: stopping on it ends the request there."""
    engine = make_engine(async_scheduling=False)
    engine.add_request("probe", prompt, SamplingParams(temperature=0, max_tokens=index + 1, ignore_eos=True))
    tokens, _ = run_to_completion(engine)
    return tokens["probe"][index]


def test_stops_lengths_and_staggered_arrivals_come_out_identical(make_engine, enable_chunked_prefill):
    prompts = random_prompts(8, seed=3)
    stop_at_4 = stop_token_of(make_engine, prompts[1], 4)
    stop_at_0 = stop_token_of(make_engine, prompts[2], 1)
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_at_4]),  # value stop
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop_token_ids=[stop_at_0]),
        SamplingParams(temperature=0.8, top_k=30, seed=7, max_tokens=9, ignore_eos=True),  # seeded draw
        SamplingParams(temperature=0, max_tokens=1, ignore_eos=True),  # ends at its first token
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2),  # waits for its tokens
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True, repetition_penalty=1.3),  # likewise
        SamplingParams(temperature=0, max_tokens=15, ignore_eos=True),
    ]
    requests = [(f"r{i}", prompt, p) for i, (prompt, p) in enumerate(zip(prompts, params))]
    arrivals = {0: requests[:3], 2: requests[3:5], 5: [requests[5]], 9: requests[6:]}
    waited, waited_stats, launched, launched_stats = both_modes(make_engine, arrivals,
                                                                enable_chunked_prefill=enable_chunked_prefill)
    assert launched == waited
    assert tokens_of(launched)["r1"][-1] == stop_at_4 and len(tokens_of(launched)["r1"]) == 5
    assert launched_stats.generation_tokens_total == waited_stats.generation_tokens_total
    assert launched_stats.finished_reasons == waited_stats.finished_reasons


def test_step_at_a_time_overlaps_decode_steps_only_while_no_row_needs_its_tokens_on_the_host(make_engine):
    engine = make_engine(enable_chunked_prefill=False)
    prompts = random_prompts(2, seed=4)
    engine.add_request("a", prompts[0], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    engine.step()  # prefill: waits
    assert engine._in_flight is None
    engine.step()  # decode: launched, nothing out yet
    assert engine._in_flight is not None
    outputs = engine.step()  # launches the next, returns the first decode token
    assert [len(o.new_token_ids) for o in outputs] == [1] and engine._in_flight is not None
    engine.add_request("b", prompts[1], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1))
    engine.step()  # a prompt waits: the step in flight completes, nothing new is launched
    assert engine._in_flight is None
    engine.step()  # prefill of b
    engine.step()  # decode with b's logprobs row: waits for its tokens
    assert engine._in_flight is None
    tokens, reasons = run_to_completion(engine)
    assert reasons == {"a": "length", "b": "length"}


def test_preemption_under_a_small_pool_comes_out_identical(make_engine, enable_chunked_prefill):
    prompts = random_prompts(10, min_len=8, max_len=14, seed=5)
    requests = [(f"r{i}", p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
                for i, p in enumerate(prompts)]
    waited, _, launched, launched_stats = both_modes(make_engine, {0: requests}, num_kv_blocks=40,
                                                    max_model_len=64, enable_chunked_prefill=enable_chunked_prefill)
    assert launched == waited
    assert launched_stats.num_preemptions > 0  # the pool was small enough to matter


def test_abort_while_in_flight_fences_blocks_until_the_step_completes(make_engine, enable_chunked_prefill):
    engine = make_engine(enable_chunked_prefill=enable_chunked_prefill)
    prompts = random_prompts(2, seed=6)
    engine.add_request("a", prompts[0], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.add_request("b", prompts[1], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    engine.step()  # one step in flight, the one before it done
    assert engine._in_flight is not None
    held = len(engine._requests["a"].block_table)
    free_before = engine.allocator.num_free_blocks
    engine.abort_request("a")
    assert engine.allocator.num_free_blocks == free_before  # the step in flight may still write them
    assert engine.allocator.num_fenced_blocks == held
    outputs = engine.step()
    finals = [o for o in outputs if o.request_id == "a"]
    assert [(o.finished, o.finish_reason, o.new_token_ids) for o in finals] == [(True, "abort", [])]
    tokens, _ = run_to_completion(engine)
    assert "a" not in tokens  # nothing after its final output
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_decode_handoffs_join_a_launched_batch_with_identical_tokens(make_engine, enable_chunked_prefill):
    prompts = random_prompts(5, seed=8)
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    results = []
    for is_async in (False, True):
        prefill = make_engine(seed=1, enable_chunked_prefill=enable_chunked_prefill)
        decode = make_engine(seed=2, async_scheduling=is_async, enable_chunked_prefill=enable_chunked_prefill)
        for i, prompt in enumerate(prompts):
            prefill.add_prefill_request(f"r{i}", prompt, params)
        firsts, _ = run_to_completion(prefill)
        tokens: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):  # one hand-off per step: they join a batch in flight
            request_id = f"r{i}"
            block_ids = decode.reserve_kv(request_id, prompt).block_ids
            decode.kv_pool.scatter_blocks(block_ids, prefill.kv_pool.gather_blocks(prefill._held[request_id].block_table))
            prefill.release_kv(request_id)
            decode.add_decode_request(request_id, prompt, firsts[request_id][0], params, block_ids)
            for output in decode.step():
                tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
        rest, _ = run_to_completion(decode)
        for request_id, more in rest.items():
            tokens.setdefault(request_id, []).extend(more)
        assert decode.stats().kv_cache_usage == 0
        results.append(tokens)
    assert results[0] == results[1]
    assert all(len(t) == 9 for t in results[1].values())


def test_fence_holds_freed_blocks_until_their_step_completes():
    allocator = BlockAllocator(8)
    a, b = allocator.allocate(2), allocator.allocate(2)
    allocator.set_fence(1)
    allocator.free(a)  # step 1 may still write a
    allocator.set_fence(2)
    allocator.free(b)  # step 2 may still write b
    assert allocator.num_free_blocks == 4 and allocator.num_fenced_blocks == 4
    assert not allocator.can_allocate(5)
    allocator.release_fence(1)
    assert allocator.num_free_blocks == 6 and allocator.num_fenced_blocks == 2
    allocator.set_fence(None)
    allocator.release_fence(2)
    assert allocator.num_free_blocks == 8 and allocator.num_fenced_blocks == 0
    c = allocator.allocate(1)
    allocator.free(c)  # no fence: straight back
    assert allocator.num_free_blocks == 8
    with pytest.raises(ValueError, match="backwards"):
        allocator.set_fence(3)
        allocator.set_fence(2)
