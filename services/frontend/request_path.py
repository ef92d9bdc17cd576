"""Conditional disaggregation: which path a request takes, decided from its prompt and the cluster.

    LOCAL          a decode-side worker (a colocated `tandem worker`, or a decode worker) computes the
                   prompt itself and decodes: `DecodeRequest.prefill_here`, no KV moves
    DISAGGREGATED  a prefill worker computes the prompt and samples token #1; the KV moves to a decode
                   worker over UCX (docs/architecture.md, "One request")

`choose_path` applies these rules in order (the idea is NVIDIA Dynamo's conditional disaggregation: a
short prompt costs a decode step little, and sparing it the hand-off saves the transfer and a hop):

    1. no prefill worker in the cluster              -> LOCAL   (colocated serving: every prompt)
    2. prompt longer than max_local_prefill_length   -> DISAGGREGATED
    3. the decode worker the router picked has room  -> LOCAL   (`has_room`: nothing queued there and
                                                                 free blocks for the prompt and token #1)
    4. otherwise                                     -> DISAGGREGATED

`--max-local-prefill-length` 0 (the default) keeps every prompt on the prefill workers while the cluster
has some, as before the rule existed. Pure functions: no I/O, no clock, no worker state changes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from common.kv.block_count import num_blocks_for
from services.common.worker_messages import WorkerStatsData


class RequestPath(enum.Enum):
    LOCAL = "local"  # one worker prefills and decodes (prefill_here)
    DISAGGREGATED = "disaggregated"  # prefill worker, then a KV hand-off to a decode worker


@dataclass(frozen=True)
class PathPolicy:
    # longest prompt (tokens) a decode worker may prefill itself while the cluster has prefill workers;
    # 0 = none (Dynamo's max_local_prefill_length)
    max_local_prefill_length: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.max_local_prefill_length, int) or self.max_local_prefill_length < 0:
            raise ValueError(f"max_local_prefill_length: must be an int >= 0, got {self.max_local_prefill_length!r}")

    def may_go_local(self, num_prompt_tokens: int, has_prefill_workers: bool) -> bool:
        """Rules 1 and 2: whether the path depends on a decode worker's room at all (if not, and the
        cluster has prefill workers, the request goes DISAGGREGATED without a decode pick first)."""
        return not has_prefill_workers or num_prompt_tokens <= self.max_local_prefill_length


def has_room(stats: WorkerStatsData | None, num_prompt_tokens: int) -> bool:
    """The worker could start the prompt at its next step: it reported stats, nothing waits in its queues
    (hand-offs for blocks, prompts for a step), and its free blocks hold the prompt plus token #1."""
    if stats is None or stats.layout is None or stats.num_waiting > 0:
        return False
    num_blocks_needed = num_blocks_for(num_prompt_tokens + 1, stats.layout.block_size)
    return stats.num_free_blocks >= num_blocks_needed


def choose_path(policy: PathPolicy, num_prompt_tokens: int, has_prefill_workers: bool,
                is_decode_room: bool) -> RequestPath:
    """The path of one request (module docstring); `is_decode_room`: `has_room` of the decode worker the
    router would pick."""
    if not has_prefill_workers:
        return RequestPath.LOCAL
    if num_prompt_tokens > policy.max_local_prefill_length:
        return RequestPath.DISAGGREGATED
    return RequestPath.LOCAL if is_decode_room else RequestPath.DISAGGREGATED
