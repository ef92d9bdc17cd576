"""The routing policy as a pure function, and the router's view of each worker's cache: the hit vs
load trade-off, ties, round-robin and random, stale and oversized summaries, predictions."""

import random
import subprocess
import sys

import pytest

from services.frontend.cache_view import CacheViewLimits, WorkerCacheView
from services.frontend.routing_policy import Candidate, RouterMode, RoutingConfig, choose, kv_cost, parse_router_mode
from tests.bench.bench_helpers import REPO

KV = RoutingConfig(RouterMode.KV)


def _candidate(num_uncached: int, num_pending: int) -> Candidate:
    return Candidate(num_uncached=num_uncached, num_pending=num_pending, load_key=(num_pending,))


def test_a_cached_prefix_wins_until_its_worker_is_loaded_by_more_than_it_saves():
    # 1,000-token prompt: worker 0 holds 900 of it, worker 1 nothing and is idle
    for pending_on_cached, expected in ((0, 0), (500, 0), (899, 0), (901, 1), (5000, 1)):
        candidates = [_candidate(100, pending_on_cached), _candidate(1000, 0)]
        assert choose(candidates, KV, turn=0) == expected, pending_on_cached


def test_the_weight_scales_what_a_cached_token_is_worth_against_load():
    candidates = [_candidate(100, 600), _candidate(1000, 0)]  # saves 900, carries 600 more
    assert choose(candidates, RoutingConfig(RouterMode.KV, 1.0), 0) == 0
    assert choose(candidates, RoutingConfig(RouterMode.KV, 0.5), 0) == 1  # saves 450 < 600
    assert choose(candidates, RoutingConfig(RouterMode.KV, 0.0), 0) == 1  # load only
    assert kv_cost(candidates[0], 2.0) == 800


def test_load_mode_ignores_what_is_cached():
    candidates = [_candidate(0, 10), _candidate(1000, 5)]
    assert choose(candidates, RoutingConfig(RouterMode.LOAD), 0) == 1
    assert choose(candidates, KV, 0) == 0


def test_ties_rotate_with_the_turn_and_only_among_the_tied():
    candidates = [_candidate(50, 0), _candidate(10, 40), _candidate(50, 0), _candidate(200, 0)]
    # costs 50, 50, 50, 200; load keys (0,), (40,), (0,), (0,): workers 0 and 2 tie
    assert [choose(candidates, KV, turn) for turn in range(4)] == [0, 2, 0, 2]


def test_round_robin_takes_each_worker_in_turn_whatever_it_holds():
    candidates = [_candidate(0, 0), _candidate(1000, 9999), _candidate(1000, 0)]
    config = RoutingConfig(RouterMode.ROUND_ROBIN)
    assert [choose(candidates, config, turn) for turn in range(6)] == [0, 1, 2, 0, 1, 2]


def test_random_covers_every_worker_and_follows_its_generator():
    candidates = [_candidate(0, 0)] * 3
    config = RoutingConfig(RouterMode.RANDOM)
    picks = [choose(candidates, config, 0, random.Random(7)) for _ in range(3)]
    assert picks == [random.Random(7).randrange(3)] * 3
    rng = random.Random(1)
    assert {choose(candidates, config, 0, rng) for _ in range(60)} == {0, 1, 2}


def test_bad_settings_and_no_candidates_raise_naming_the_field():
    with pytest.raises(ValueError, match="router_mode: must be one of"):
        parse_router_mode("least-loaded")
    assert parse_router_mode("round-robin") is RouterMode.ROUND_ROBIN
    with pytest.raises(ValueError, match="kv_overlap_score_weight"):
        RoutingConfig(RouterMode.KV, -1.0)
    with pytest.raises(ValueError, match="kv_overlap_score_weight"):
        RoutingConfig(RouterMode.KV, float("nan"))
    with pytest.raises(ValueError, match="no candidate"):
        choose([], KV, 0)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _view(**limits) -> tuple[WorkerCacheView, FakeClock]:
    clock = FakeClock()
    return WorkerCacheView(CacheViewLimits(**limits), clock), clock


def test_the_deepest_key_found_counts_every_block_before_it():
    view, _ = _view()
    request = [11, 12, 13, 14, 15]
    assert view.update([14, 999])  # the summary lost the old blocks 11..13, kept the newer 14
    assert view.num_cached_blocks(request) == 4
    assert view.num_cached_blocks([11, 12]) == 0
    assert view.num_cached_blocks([]) == 0


def test_a_stale_summary_is_ignored_and_a_fresh_one_replaces_it():
    view, clock = _view(max_age_seconds=5.0)
    view.update([1, 2])
    clock.now += 4.9
    assert view.num_cached_blocks([1, 2]) == 2
    clock.now += 0.2
    assert view.num_cached_blocks([1, 2]) == 0
    view.update([1])
    assert view.num_cached_blocks([1, 2]) == 1


def test_an_oversized_summary_is_dropped_not_trusted():
    view, _ = _view(max_summary_keys=3)
    assert view.update([1, 2, 3])
    assert not view.update([1, 2, 3, 4])
    assert view.num_cached_blocks([1, 2, 3, 4]) == 0 and view.num_dropped_summaries == 1 and view.num_summary_keys == 0


def test_predictions_count_until_they_expire_and_stay_bounded():
    view, clock = _view(prediction_seconds=2.0, max_predicted_keys=4)
    view.predict([1, 2, 3])
    clock.now += 1.0
    view.predict([7, 8])  # 5 keys > 4: the oldest (1) goes
    assert view.num_cached_blocks([1]) == 0 and view.num_cached_blocks([2, 3]) == 2
    clock.now += 1.5  # 2, 3 expired; 7, 8 not yet
    assert view.num_cached_blocks([2, 3]) == 0 and view.num_cached_blocks([7, 8]) == 2
    view.clear()
    assert view.num_cached_blocks([7, 8]) == 0


def test_the_routing_modules_never_import_torch():
    script = ("import sys; import common.kv.block_hash, services.frontend.cache_view, "
              "services.frontend.routing_policy, services.frontend.router_metrics; "
              "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
