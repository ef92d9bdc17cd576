"""The `kv` router end to end inside the frontend: worker summaries arrive through GetStats (a stub
worker answers it), requests are matched by their block hashes, hits are balanced against load, a
conversation's next turn follows its earlier one, and what a lost worker cached is forgotten."""

import asyncio

from prometheus_client import CollectorRegistry

from common.kv.block_hash import full_block_hashes, routing_key
from common.kv.layout import KVLayout
from protos import worker_pb2
from services.common.worker_messages import WorkerStatsData, stats_to_pb
from services.frontend.cache_view import CacheViewLimits
from services.frontend.router import ROUTE_CACHED_TOKENS, Router
from services.frontend.router_metrics import RouterMetrics
from services.frontend.routing_policy import RouterMode, RoutingConfig

BLOCK_SIZE = 4
SYSTEM = list(range(1000, 1040))  # 10 blocks shared by every conversation


def _keys(token_ids: list[int], block_size: int = BLOCK_SIZE) -> list[int]:
    return [routing_key(h) for h in full_block_hashes(token_ids, block_size)]


def _stats(role: str, cached_token_ids: list[int] = (), block_size: int = BLOCK_SIZE, **fields) -> WorkerStatsData:
    layout = KVLayout("m", "float32", block_size, 2, 2, 8)
    fields = {"num_free_blocks": 1000, "num_total_blocks": 1000, **fields}
    return WorkerStatsData(role=role, is_ready=True, layout=layout, is_prefix_caching_enabled=True,
                           cached_block_keys=_keys(list(cached_token_ids), block_size), **fields)


class StubWorker:
    """Answers GetStats with whatever `answer` holds (a WorkerStats message, or an RpcError to raise)."""

    def __init__(self, answer):
        self.answer = answer

    async def GetStats(self, request, timeout=None):
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def _router(num_prefill=2, num_decode=2, mode=RouterMode.KV, metrics=None, limits=None) -> Router:
    asyncio.set_event_loop(asyncio.new_event_loop())  # grpc.aio channels need a current loop
    return Router([f"127.0.0.1:{1000 + i}" for i in range(num_prefill)],
                  [f"127.0.0.1:{2000 + i}" for i in range(num_decode)], routing=RoutingConfig(mode),
                  metrics=metrics, cache_limits=limits)


def _publish(router: Router, answers: dict[str, object]) -> None:
    """Every worker answers GetStats with its entry of `answers` (by address), then the router polls."""
    for worker in router.workers:
        answer = answers[worker.address]
        worker.stub = StubWorker(stats_to_pb(answer) if isinstance(answer, WorkerStatsData) else answer)
    asyncio.get_event_loop().run_until_complete(router.refresh())


WARMUP = list(range(5000, 5008))  # what every worker cached before the test's requests


def _idle(router: Router) -> dict[str, object]:
    return {w.address: _stats(w.role, WARMUP) for w in router.workers}


def test_prefill_goes_to_the_worker_holding_the_longest_prefix_until_its_queue_outweighs_it():
    router = _router()
    cold, warm = router.prefill_workers
    conversation = SYSTEM + list(range(1, 41))  # 80 tokens, 20 blocks
    answers = _idle(router)
    answers[warm.address] = _stats("prefill", conversation)
    answers[cold.address] = _stats("prefill", SYSTEM)
    _publish(router, answers)
    assert router.pick_prefill(conversation + [7] * 5) is warm
    # a next turn (85 tokens): warm holds 80, cold 40; a queue of more than the 40 saved loses it
    # (each pick's own suffix differs: a picked prompt counts as cached on its worker afterwards)
    with router.track(warm, num_prompt_tokens=39):
        assert router.pick_prefill(conversation + [8] * 5) is warm
    with router.track(warm, num_prompt_tokens=41):
        assert router.pick_prefill(conversation + [9] * 5) is cold


def test_a_burst_sharing_a_prefix_spreads_over_the_workers_by_load():
    router = _router()
    _publish(router, _idle(router))
    picks, in_flight = [], []
    for index in range(8):
        worker = router.pick_prefill(SYSTEM + [index] * 8)
        picks.append(worker.address)
        in_flight.append(router.track(worker, num_prompt_tokens=48))
        in_flight[-1].__enter__()  # still in flight when the next one arrives
    assert [picks.count(w.address) for w in router.prefill_workers] == [4, 4]


def test_a_conversations_next_turn_follows_it_before_any_summary_shows_it():
    router = _router()
    _publish(router, _idle(router))
    first_turns = {name: SYSTEM + [name] * 12 for name in (1, 2, 3, 4)}
    placed, in_flight = {}, []
    for name, prompt in first_turns.items():  # all four in flight together: they spread
        placed[name] = router.pick_prefill(prompt)
        in_flight.append(router.track(placed[name], num_prompt_tokens=len(prompt)))
        in_flight[-1].__enter__()
    assert sorted(w.address for w in placed.values()) == sorted([w.address for w in router.prefill_workers] * 2)
    for context in in_flight:
        context.__exit__(None, None, None)
    for name, prompt in first_turns.items():
        assert router.pick_prefill(prompt + [99] * 10) is placed[name]


def test_decode_prefers_the_worker_holding_the_conversation_unless_it_is_much_fuller():
    router = _router()
    holder, other = router.decode_workers
    conversation = SYSTEM + list(range(1, 41))  # 20 blocks
    answers = _idle(router)
    answers[holder.address] = _stats("decode", conversation, num_free_blocks=940)  # 60 blocks in use
    answers[other.address] = _stats("decode", num_free_blocks=950)  # 50 in use
    _publish(router, answers)
    prompt = conversation + [5, 6, 7, 8, 9]  # 22 blocks; the holder lacks 2, the other 22
    assert router.pick_decode(prompt) is holder  # 2 + 60 < 22 + 50
    answers[holder.address] = _stats("decode", conversation, num_free_blocks=800)  # 200 in use: 202 > 72
    _publish(router, answers)
    assert router.pick_decode(prompt) is other


def test_a_worker_that_never_published_a_cached_block_gets_no_predictions():
    router = _router()
    answers = _idle(router)
    silent = router.decode_workers[0]
    answers[silent.address] = _stats("decode")  # caching on, but nothing handed off is ever cached
    _publish(router, answers)
    prompt = SYSTEM + [3] * 8
    while router.pick_decode(prompt) is not silent:
        pass
    assert silent.cache_view.num_cached_blocks(_keys(prompt)) == 0
    other = router.decode_workers[1]
    while router.pick_decode(prompt + [4] * 4) is not other:
        pass
    assert other.cache_view.num_cached_blocks(_keys(prompt + [4] * 4)) == 13


def test_decode_counts_blocks_routed_since_the_last_report():
    router = _router()
    _publish(router, _idle(router))
    prompt = list(range(40))  # 10 blocks, cached nowhere
    picks = [router.pick_decode(prompt) for _ in range(4)]
    assert [picks.count(w) for w in router.decode_workers] == [2, 2]
    _publish(router, _idle(router))
    assert all(w.num_blocks_routed_since_stats == 0 for w in router.decode_workers)


def test_a_lost_worker_is_skipped_and_what_it_cached_forgotten():
    router = _router()
    holder, other = router.prefill_workers
    answers = _idle(router)
    answers[holder.address] = _stats("prefill", SYSTEM + [1] * 20)
    _publish(router, answers)
    assert router.pick_prefill(SYSTEM + [1] * 24) is holder
    answers[holder.address] = _unavailable()
    _publish(router, answers)
    assert not holder.is_healthy and holder.cache_view.num_summary_keys == 0
    assert router.pick_prefill(SYSTEM + [1] * 24) is other
    answers[holder.address] = _stats("prefill")  # back, restarted: its cache is empty
    _publish(router, answers)
    assert holder.cache_view.num_cached_blocks(_keys(SYSTEM)) == 0
    assert not holder.cache_view.has_published_keys


def test_an_oversized_summary_is_ignored_and_its_worker_still_serves():
    router = _router(limits=CacheViewLimits(max_summary_keys=16))
    greedy, honest = router.prefill_workers
    answers = _idle(router)
    answers[greedy.address] = _stats("prefill", SYSTEM + list(range(1, 41)))  # 20 keys > 16
    answers[honest.address] = _stats("prefill", SYSTEM)
    _publish(router, answers)
    assert greedy.is_healthy and greedy.stats.cached_block_keys == []
    assert router.pick_prefill(SYSTEM + list(range(1, 41))) is honest


def test_keys_are_computed_with_each_workers_own_block_size():
    router = _router()
    first, second = router.prefill_workers
    prompt = SYSTEM + list(range(1, 25))
    answers = _idle(router)
    answers[first.address] = _stats("prefill", prompt, block_size=8)
    answers[second.address] = _stats("prefill", prompt[:16], block_size=4)
    _publish(router, answers)
    assert first.cache_view.num_cached_blocks(_keys(prompt, 8)) == 8
    assert first.cache_view.num_cached_blocks(_keys(prompt, 4)) == 0
    assert router.pick_prefill(prompt + [1]) is first


def test_round_robin_ignores_caches_and_decisions_are_counted_in_kv_mode():
    router = _router(mode=RouterMode.ROUND_ROBIN)
    answers = _idle(router)
    answers[router.prefill_workers[0].address] = _stats("prefill", SYSTEM)
    _publish(router, answers)
    assert [router.pick_prefill(SYSTEM + [1]) for _ in range(4)] == router.prefill_workers * 2

    registry = CollectorRegistry()
    router = _router(metrics=RouterMetrics(registry, "m"))
    answers = _idle(router)
    answers[router.prefill_workers[0].address] = _stats("prefill", SYSTEM)
    _publish(router, answers)
    router.pick_prefill(SYSTEM + [1, 2, 3])
    labels = {"model_name": "m", "role": "frontend", "worker_role": "prefill"}
    assert registry.get_sample_value("tandem:router_prompt_tokens_total", labels) == 43
    assert registry.get_sample_value("tandem:router_cached_prompt_tokens_total", labels) == 40


def test_the_route_span_carries_the_cached_tokens():
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    router = _router()
    answers = _idle(router)
    answers[router.prefill_workers[1].address] = _stats("prefill", SYSTEM)
    _publish(router, answers)
    with provider.get_tracer("test").start_as_current_span("route"):
        router.pick_prefill(SYSTEM + [1, 2])
    (span,) = exporter.get_finished_spans()
    assert span.attributes[ROUTE_CACHED_TOKENS] == 40


def _unavailable():
    import grpc

    class Unreachable(grpc.aio.AioRpcError):
        def __init__(self):
            super().__init__(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")

    return Unreachable()


def test_the_frontend_config_names_a_bad_router_setting():
    import pytest

    from services.frontend.app import FrontendConfig

    config = FrontendConfig(["h:1"], ["h:2"], router_mode="round-robin", kv_overlap_score_weight=0.5)
    assert config.routing == RoutingConfig(RouterMode.ROUND_ROBIN, 0.5)
    assert FrontendConfig(["h:1"], ["h:2"]).routing.mode is RouterMode.KV  # the default
    with pytest.raises(ValueError, match="router_mode: must be one of"):
        FrontendConfig(["h:1"], ["h:2"], router_mode="least-loaded")
    with pytest.raises(ValueError, match="kv_overlap_score_weight"):
        FrontendConfig(["h:1"], ["h:2"], kv_overlap_score_weight=-2.0)


def test_a_decode_choice_is_recorded_only_when_committed():
    """The frontend asks which decode worker would take a short prompt before deciding whether it stays
    off the prefill workers; a choice it drops must leave no load, prediction or metric behind."""
    registry = CollectorRegistry()
    router = _router(metrics=RouterMetrics(registry, "m"))
    _publish(router, _idle(router))
    prompt = list(range(40))  # 10 blocks, cached nowhere
    labels = {"model_name": "m", "role": "frontend", "worker_role": "decode"}
    choice = router.choose_decode(prompt)
    assert all(w.num_blocks_routed_since_stats == 0 for w in router.decode_workers)
    assert choice.worker.cache_view.num_cached_blocks(_keys(prompt)) == 0
    assert not registry.get_sample_value("tandem:router_prompt_tokens_total", labels)
    assert router.commit(choice) is choice.worker
    assert choice.worker.num_blocks_routed_since_stats == 10
    assert choice.worker.cache_view.num_cached_blocks(_keys(prompt)) == 10  # predicted cached there
    assert registry.get_sample_value("tandem:router_prompt_tokens_total", labels) == 40
