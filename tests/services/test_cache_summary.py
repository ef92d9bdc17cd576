"""Workers publish their prefix cache in GetStats (bounded, newest first, rebuilt at most every
refresh interval), and the frontend's router reads it: a prompt served once is found on its worker."""

import time
from types import SimpleNamespace

import grpc

from common.kv.block_allocator import BlockAllocator
from common.kv.block_hash import ROOT_HASH, full_block_hashes, hash_block, routing_key
from common.kv.prefix_cache import PrefixCache
from protos import generation_pb2 as g
from protos import generation_pb2_grpc
from services.common.cache_summary import CacheSummaryPublisher

BLOCK_SIZE = 4  # tests/services/inprocess.py's engines


def _wait_for(condition, timeout_seconds: float = 10.0):
    deadline = time.monotonic() + timeout_seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)
    return value


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_summary_is_capped_newest_first_and_rebuilt_only_after_the_refresh_interval():
    allocator = BlockAllocator(8)
    cache = PrefixCache(allocator)
    clock = FakeClock()
    publisher = CacheSummaryPublisher(SimpleNamespace(prefix_cache=cache), max_blocks=2, refresh_seconds=1.0,
                                      clock=clock)
    hashes = [hash_block(ROOT_HASH, [i]) for i in range(3)]
    for block_id, block_hash in zip(allocator.allocate(2), hashes):
        cache.register(block_id, block_hash)
    assert publisher.cached_block_keys() == [routing_key(hashes[1]), routing_key(hashes[0])]
    cache.register(allocator.allocate(1)[0], hashes[2])
    clock.now = 0.9
    assert publisher.cached_block_keys() == [routing_key(hashes[1]), routing_key(hashes[0])]  # not yet rebuilt
    clock.now = 1.0
    assert publisher.cached_block_keys() == [routing_key(hashes[2]), routing_key(hashes[1])]
    engine_stats = SimpleNamespace(prefix_cache_queries_tokens=10, prefix_cache_hits_tokens=4)
    fields = publisher.stats_fields(engine_stats)
    assert (fields["prefix_cache_queries_tokens"], fields["prefix_cache_hits_tokens"]) == (10, 4)
    assert fields["is_prefix_caching_enabled"] is True
    off = CacheSummaryPublisher(SimpleNamespace(prefix_cache=None)).stats_fields(engine_stats)
    assert off["cached_block_keys"] == [] and off["is_prefix_caching_enabled"] is False


def _generate(system, prompt: list[int]) -> None:
    request = g.GenerateRequest(token_ids=g.TokenIds(ids=prompt),
                                sampling=g.SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
    with grpc.insecure_channel(system.frontend_address) as channel:
        messages = list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60))
    assert messages[-1].HasField("final")


def test_a_served_prompt_shows_in_the_prefill_workers_stats_and_the_routers_view(make_system):
    system = make_system()
    prompt = list(range(300, 340))  # 10 full blocks
    keys = [routing_key(h) for h in full_block_hashes(prompt, BLOCK_SIZE)]
    _generate(system, prompt)
    prefill = _wait_for(lambda: (s := system.worker_stats()[0]).cached_block_keys and s)
    assert prefill.is_prefix_caching_enabled
    assert list(prefill.cached_block_keys)[:len(keys)] == keys[::-1]  # newest (deepest) first
    assert prefill.prefix_cache_queries_tokens >= len(prompt) and prefill.prefix_cache_hits_tokens == 0
    view = system.app.router.prefill_workers[0].cache_view
    _wait_for(lambda: view.num_summary_keys >= len(keys))
    assert view.num_cached_blocks(keys + [12345]) == len(keys)
    _generate(system, prompt + [7] * 8)
    prefill = _wait_for(lambda: (s := system.worker_stats()[0]).prefix_cache_hits_tokens and s)
    assert prefill.prefix_cache_hits_tokens == len(prompt)  # the whole first prompt, not recomputed


def test_a_worker_without_prefix_caching_publishes_nothing(make_system):
    system = make_system(prefill_overrides={"enable_prefix_caching": False})
    _generate(system, list(range(300, 340)))
    prefill, _ = system.wait_until_idle()
    assert not prefill.is_prefix_caching_enabled and list(prefill.cached_block_keys) == []
    assert prefill.prefix_cache_queries_tokens == 0
