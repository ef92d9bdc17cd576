"""Routing by load (`--router-mode load`, and `kv` when nothing is cached): least-loaded prefill (queued
prompt tokens) and decode (in-flight requests, free blocks)."""

import asyncio

import pytest

from services.common.errors import Unavailable
from services.common.worker_messages import WorkerStatsData
from services.frontend.router import Router
from services.frontend.routing_policy import RouterMode, RoutingConfig


def _router(num_prefill=2, num_decode=2, mode=RouterMode.KV) -> Router:
    asyncio.set_event_loop(asyncio.new_event_loop())  # grpc.aio channels need a current loop
    router = Router([f"127.0.0.1:{1000 + i}" for i in range(num_prefill)],
                    [f"127.0.0.1:{2000 + i}" for i in range(num_decode)], routing=RoutingConfig(mode))
    for worker in router.workers:
        worker.is_healthy = True
        worker.stats = WorkerStatsData(role=worker.role, is_ready=True, num_free_blocks=100, num_total_blocks=100)
    return router


def test_prefill_goes_to_the_worker_with_fewest_prompt_tokens_in_flight():
    router = _router()
    first, second = router.prefill_workers
    with router.track(first, num_prompt_tokens=500):
        assert router.pick_prefill() is second
        with router.track(second, num_prompt_tokens=600):
            assert router.pick_prefill() is first
    assert first.num_inflight_prompt_tokens == second.num_inflight_prompt_tokens == 0


def test_decode_prefers_fewer_requests_then_more_free_blocks():
    router = _router(mode=RouterMode.LOAD)
    first, second = router.decode_workers
    second.stats.num_free_blocks = 10
    assert router.pick_decode() is first
    with router.track(first), router.track(first):
        with router.track(second):
            assert router.pick_decode() is second


def test_ties_rotate_so_every_worker_gets_work():
    router = _router(num_prefill=3)
    picked = {router.pick_prefill().address for _ in range(6)}
    assert len(picked) == 3


def test_unhealthy_workers_are_skipped_and_none_left_is_unavailable():
    router = _router()
    router.mark_unhealthy(router.decode_workers[0])
    assert router.pick_decode() is router.decode_workers[1]
    router.mark_unhealthy(router.decode_workers[1])
    with pytest.raises(Unavailable, match="no decode worker"):
        router.pick_decode()
    assert not router.is_ready()


def test_unreachable_worker_is_marked_unhealthy_by_refresh():
    async def run():
        router = _router(num_prefill=1, num_decode=1)
        await router.refresh()  # nothing listens on these ports
        is_ready = router.is_ready()
        await router.close()
        return is_ready

    assert asyncio.run(run()) is False


def test_interleaved_picks_of_both_kinds_still_spread_each_kind():
    router = _router()
    decode_picks = []
    for _ in range(4):
        router.pick_prefill()
        decode_picks.append(router.pick_decode().address)
    assert len(set(decode_picks)) == 2
