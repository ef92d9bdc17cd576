"""Which worker gets a request: pure functions over what the router knows of each candidate.

`--router-mode` (Dynamo's flag name) picks the policy:

    kv           (default) cache-aware: the least expected work, counting what each worker has cached
    load         the least loaded worker, caches ignored (Tandem's policy before cache-aware routing)
    round-robin  each healthy worker in turn
    random       a healthy worker at random

kv, prefill: for each worker, in prompt tokens,

    cost = kv_overlap_score_weight * (prompt tokens - tokens the worker has cached)   # work this request adds
         + prompt tokens already in flight there (this frontend's) + its reported queue  # work ahead of it

and the cheapest worker wins: a cached prefix pulls a request to its worker exactly as far as the
computation it saves, so a worker whose queue has grown past that saving loses the next request to an
idle one (one hot prefix does not swamp its worker). With nothing cached anywhere the first term is the
same for every worker and kv is load.

kv, decode: the same in KV blocks: blocks the worker would pull (the prompt's blocks less those it holds,
e.g. a conversation's earlier turn decoded there) times the weight, plus the blocks it has in use
(reported) and those routed there since that report.

Ties (equal cost, equal load) rotate among the tied workers, so equal workers share the work.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass


class RouterMode(str, enum.Enum):
    KV = "kv"
    LOAD = "load"
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"


DEFAULT_ROUTER_MODE = RouterMode.KV


def parse_router_mode(value: RouterMode | str) -> RouterMode:
    """ValueError naming the field and the choices for anything else."""
    try:
        return RouterMode(value)
    except ValueError:
        raise ValueError(f"router_mode: must be one of {[m.value for m in RouterMode]}, got {value!r}") from None


@dataclass(frozen=True)
class Candidate:
    """One healthy worker as the policy sees it; every count is >= 0."""

    num_uncached: int  # of the request's prompt, tokens (prefill) or blocks (decode) the worker lacks
    num_pending: int  # work already there: prompt tokens queued (prefill) or KV blocks in use (decode)
    load_key: tuple[int, ...]  # the load policy's ordering, smaller is less loaded


@dataclass(frozen=True)
class RoutingConfig:
    mode: RouterMode = DEFAULT_ROUTER_MODE
    kv_overlap_score_weight: float = 1.0  # how much a cached token (block) saved counts against load

    def __post_init__(self) -> None:
        if not isinstance(self.mode, RouterMode):
            raise ValueError(f"router_mode: must be one of {[m.value for m in RouterMode]}, got {self.mode!r}")
        if not self.kv_overlap_score_weight >= 0:
            raise ValueError(f"kv_overlap_score_weight: must be >= 0, got {self.kv_overlap_score_weight}")


def kv_cost(candidate: Candidate, weight: float) -> float:
    """Work this request adds on the worker (what it lacks, weighted) plus the work already there."""
    return weight * candidate.num_uncached + candidate.num_pending


def choose(candidates: Sequence[Candidate], config: RoutingConfig, turn: int,
           rng: random.Random | None = None) -> int:
    """Index of the chosen candidate; `turn`: a counter that grows by one per pick of this kind
    (round-robin, and rotation among ties)."""
    if not candidates:
        raise ValueError("no candidate worker")
    if config.mode is RouterMode.ROUND_ROBIN:
        return turn % len(candidates)
    if config.mode is RouterMode.RANDOM:
        return (rng or random).randrange(len(candidates))
    if config.mode is RouterMode.LOAD:
        keys = [c.load_key for c in candidates]
    else:
        keys = [(kv_cost(c, config.kv_overlap_score_weight), c.load_key) for c in candidates]
    best = min(keys)
    tied = [index for index, key in enumerate(keys) if key == best]
    return tied[turn % len(tied)]
