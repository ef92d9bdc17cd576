"""The router's belief of what one worker has cached, and a request's block keys to match against it.

    GetStats answer ─► update(keys)   the worker's summary: routing keys of its newest cached blocks
    a request sent  ─► predict(keys)  its prompt's blocks, counted as cached there for a few seconds
                                      (until the worker's own summaries have caught up with it), once
                                      the worker has shown that it caches (a non-empty summary)
    num_cached_blocks(request keys)   the deepest request block found: every block before it is the
                                      same prefix (chained hashes), so the worker holds them all

A summary is untrusted input: one longer than `max_summary_keys` is dropped (the view is then empty, as
for a worker that caches nothing), and one older than `max_age_seconds` is ignored. A wrong key can only
send a request to a worker that computes more of it than expected; the workers match blocks by their
full 16-byte hashes.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.kv.block_hash import full_block_hashes, routing_key

DEFAULT_MAX_SUMMARY_KEYS = 1 << 17  # 1 MiB of keys: 16x a worker's default summary
DEFAULT_MAX_AGE_SECONDS = 5.0
DEFAULT_PREDICTION_SECONDS = 2.0
DEFAULT_MAX_PREDICTED_KEYS = 1 << 16


@dataclass(frozen=True)
class CacheViewLimits:
    max_summary_keys: int = DEFAULT_MAX_SUMMARY_KEYS  # a longer summary is dropped
    max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS  # an older summary is ignored
    prediction_seconds: float = DEFAULT_PREDICTION_SECONDS  # how long a routed request's blocks count as cached
    max_predicted_keys: int = DEFAULT_MAX_PREDICTED_KEYS  # per worker; the oldest go first

    def __post_init__(self) -> None:
        for name in ("max_summary_keys", "max_predicted_keys"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("max_age_seconds", "prediction_seconds"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")


class PromptKeys:
    """A prompt's block routing keys, computed once per block size (workers may differ)."""

    def __init__(self, token_ids: Sequence[int]):
        self.token_ids = token_ids
        self._keys: dict[int, list[int]] = {}

    def for_block_size(self, block_size: int) -> list[int]:
        keys = self._keys.get(block_size)
        if keys is None:
            keys = self._keys[block_size] = [routing_key(h) for h in full_block_hashes(self.token_ids, block_size)]
        return keys


class WorkerCacheView:
    def __init__(self, limits: CacheViewLimits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits = limits or CacheViewLimits()
        self._clock = clock
        self._summary: frozenset[int] = frozenset()
        self._summary_at = float("-inf")  # when the summary arrived
        self._predicted: collections.OrderedDict[int, float] = collections.OrderedDict()  # key -> expiry, in order
        self.num_dropped_summaries = 0  # summaries refused for their size
        # Whether the worker ever published a cached block: proof that it caches what it is sent (a decode
        # worker may not cache handed-off KV), so routing a request there makes its blocks predictable.
        self.has_published_keys = False

    @property
    def num_summary_keys(self) -> int:
        return len(self._summary)

    def update(self, keys: Sequence[int]) -> bool:
        """A worker's summary replaces the last one; False (and an empty view) when it is too long."""
        self._summary_at = self._clock()
        if len(keys) > self.limits.max_summary_keys:
            self._summary = frozenset()
            self.num_dropped_summaries += 1
            return False
        self._summary = frozenset(keys)
        self.has_published_keys = self.has_published_keys or bool(self._summary)
        return True

    def clear(self) -> None:
        """The worker is gone or restarted: nothing it cached is known any more."""
        self._summary, self._summary_at = frozenset(), float("-inf")
        self._predicted.clear()
        self.has_published_keys = False

    def predict(self, keys: Sequence[int]) -> None:
        """A request with these block keys was just routed to the worker: it will cache them (the router
        predicts only for a worker that `has_published_keys`)."""
        now = self._clock()
        expiry = now + self.limits.prediction_seconds
        predicted = self._predicted
        for key in keys:
            predicted.pop(key, None)
            predicted[key] = expiry
        self._expire(now)

    def num_cached_blocks(self, keys: Sequence[int]) -> int:
        """How many leading blocks of a request (by its block keys) the worker is believed to hold."""
        now = self._clock()
        self._expire(now)
        summary = self._summary if now - self._summary_at <= self.limits.max_age_seconds else frozenset()
        predicted = self._predicted
        for index in range(len(keys) - 1, -1, -1):
            if keys[index] in summary or keys[index] in predicted:
                return index + 1
        return 0

    def _expire(self, now: float) -> None:
        predicted = self._predicted
        while predicted and (len(predicted) > self.limits.max_predicted_keys or next(iter(predicted.values())) < now):
            predicted.popitem(last=False)
