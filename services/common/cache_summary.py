"""What a worker tells routers about its prefix cache, in GetStats: a bounded summary, rebuilt on the
engine thread at most every `refresh_seconds`.

    engine thread, after each step: stats_fields(engine_stats)
        ─► {"cached_block_keys": [routing keys of the newest cached blocks, newest first, <= max_blocks],
            "prefix_cache_queries_tokens": ..., "prefix_cache_hits_tokens": ...}  ─► WorkerStats

Why a summary and not a stream of stored/evicted events (Dynamo's KV events): each GetStats answer
replaces the router's whole view of the worker, so a lost message, a restarted worker or a second
frontend never leaves a router with a wrong index to repair; the price is a bounded message
(8 bytes a block: 64 KiB at the default 8,192 blocks) every poll, and a view up to one poll plus one
rebuild old. The newest blocks are the ones worth routing to: a conversation's next turn extends the
blocks its last turn cached, and each block's key names its whole prefix, so the newest keys alone
find it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from common.kv.block_hash import routing_key

DEFAULT_MAX_SUMMARY_BLOCKS = 8192
DEFAULT_SUMMARY_REFRESH_SECONDS = 0.25


class CacheSummaryPublisher:
    """Builds the prefix-cache fields of a worker's stats (call it only on the engine thread: the cache
    changes there)."""

    def __init__(self, engine, max_blocks: int = DEFAULT_MAX_SUMMARY_BLOCKS,
                 refresh_seconds: float = DEFAULT_SUMMARY_REFRESH_SECONDS,
                 clock: Callable[[], float] = time.monotonic):
        if max_blocks < 0:
            raise ValueError(f"max_blocks: must be >= 0, got {max_blocks}")
        if refresh_seconds < 0:
            raise ValueError(f"refresh_seconds: must be >= 0, got {refresh_seconds}")
        self._prefix_cache = engine.prefix_cache  # None with prefix caching off
        self.max_blocks = max_blocks
        self.refresh_seconds = refresh_seconds
        self._clock = clock
        self._keys: list[int] = []
        self._built_at = float("-inf")

    def cached_block_keys(self) -> list[int]:
        """Routing keys of the newest cached blocks, newest first; rebuilt when older than refresh_seconds."""
        if self._prefix_cache is None:
            return []
        now = self._clock()
        if now - self._built_at >= self.refresh_seconds:
            self._keys = [routing_key(h) for h in self._prefix_cache.recent_hashes(self.max_blocks)]
            self._built_at = now
        return self._keys

    def stats_fields(self, engine_stats) -> dict:
        """The WorkerStatsData fields this module owns."""
        return {
            "cached_block_keys": self.cached_block_keys(),
            "prefix_cache_queries_tokens": engine_stats.prefix_cache_queries_tokens,
            "prefix_cache_hits_tokens": engine_stats.prefix_cache_hits_tokens,
            "is_prefix_caching_enabled": self._prefix_cache is not None,
        }
