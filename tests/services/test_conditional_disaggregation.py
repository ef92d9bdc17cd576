"""Conditional disaggregation's rule (services/frontend/request_path.py) and the frontend config around it."""

import pytest

from common.kv.layout import KVLayout
from services.common.worker_messages import WorkerStatsData
from services.frontend.app import FrontendConfig
from services.frontend.request_path import RequestPath, PathPolicy, choose_path, has_room

LOCAL, DISAGGREGATED = RequestPath.LOCAL, RequestPath.DISAGGREGATED
LAYOUT = KVLayout("m", "float32", 16, 2, 2, 32)


def _stats(num_free_blocks: int, num_waiting: int = 0, layout: KVLayout | None = LAYOUT) -> WorkerStatsData:
    return WorkerStatsData(role="decode", is_ready=True, num_free_blocks=num_free_blocks, num_total_blocks=100,
                           num_waiting=num_waiting, layout=layout)


@pytest.mark.parametrize("num_prompt_tokens, threshold, has_prefill_workers, is_decode_room, expected", [
    (5000, 0, False, False, LOCAL),  # no prefill worker: every prompt, whatever its length or the room
    (10, 512, False, True, LOCAL),
    (513, 512, True, True, DISAGGREGATED),  # longer than the threshold
    (512, 512, True, True, LOCAL),  # at the threshold, with room
    (1, 512, True, False, DISAGGREGATED),  # short, but the picked decode worker has no room
    (1, 0, True, True, DISAGGREGATED),  # threshold 0: every prompt to the prefill workers
])
def test_choose_path_follows_the_documented_rules(num_prompt_tokens, threshold, has_prefill_workers,
                                                  is_decode_room, expected):
    policy = PathPolicy(threshold)
    assert choose_path(policy, num_prompt_tokens, has_prefill_workers, is_decode_room) is expected
    # a decode worker is picked only when its room can change the answer
    assert policy.may_go_local(num_prompt_tokens, has_prefill_workers) == (
        not has_prefill_workers or num_prompt_tokens <= threshold)


def test_room_needs_blocks_for_the_prompt_and_token_1_and_an_empty_queue():
    # 47 tokens + token #1 fill exactly 3 blocks of 16; 48 need a 4th
    assert has_room(_stats(num_free_blocks=3), 47)
    assert not has_room(_stats(num_free_blocks=3), 48)
    assert has_room(_stats(num_free_blocks=4), 48)
    assert not has_room(_stats(num_free_blocks=100, num_waiting=1), 1)  # its queue already waits
    assert not has_room(None, 1)  # never reported its stats
    assert not has_room(_stats(num_free_blocks=100, layout=None), 1)


def test_the_threshold_must_be_a_non_negative_int():
    for bad in (-1, 1.5, "8"):
        with pytest.raises(ValueError, match="max_local_prefill_length"):
            PathPolicy(bad)


def test_a_frontend_needs_a_decode_side_worker_but_no_prefill_worker():
    config = FrontendConfig(prefill_addresses=[], decode_addresses=["h:1", "h:2"])
    assert config.max_local_prefill_length == 0
    with pytest.raises(ValueError, match="decode_addresses"):
        FrontendConfig(prefill_addresses=["h:1"], decode_addresses=[])
    with pytest.raises(ValueError, match="max_local_prefill_length"):
        FrontendConfig(prefill_addresses=["h:1"], decode_addresses=["h:2"], max_local_prefill_length=-5)
