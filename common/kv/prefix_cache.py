"""Automatic prefix caching: finds full KV blocks another request already computed, by content hash.

    hash (block_hash.py) ──► block id      for full blocks whose KV is complete

The cache only maps hashes to blocks; holding and freeing stay with `BlockAllocator`. A request that
reuses a cached prefix `fork`s those blocks (one more holder each; a block nobody held is revived from
the allocator's cached-free LRU). When the last holder frees a cached block it stays findable until an
allocation evicts it, least recently freed first; `on_evict` then drops its hash here. Cached blocks
are full and never written again: a request only ever writes past its cached prefix.
"""

from __future__ import annotations

import itertools

from common.kv.block_allocator import BlockAllocator


class PrefixCache:
    def __init__(self, allocator: BlockAllocator):
        if allocator.on_evict is not None:
            raise ValueError("the allocator already serves another prefix cache")
        self.allocator = allocator
        self._block_ids: dict[bytes, int] = {}  # hash -> block id
        self._hashes: dict[int, bytes] = {}  # block id -> hash
        self.num_evicted_blocks = 0  # cached blocks handed to other requests so far
        allocator.on_evict = self._forget

    @property
    def num_cached_blocks(self) -> int:
        """Blocks findable by hash (held or cached-free)."""
        return len(self._block_ids)

    def lookup(self, block_hashes: list[bytes]) -> list[int]:
        """Block ids of the longest prefix of `block_hashes` that is cached and can be forked now
        (blocks freed while a step is in flight are not, until their fence is released)."""
        block_ids: list[int] = []
        for block_hash in block_hashes:
            block_id = self._block_ids.get(block_hash)
            if block_id is None or not self.allocator.can_fork(block_id):
                break
            block_ids.append(block_id)
        return block_ids

    def register(self, block_id: int, block_hash: bytes) -> bool:
        """Makes a held block with complete KV findable by `block_hash`; False (nothing changes) when
        that hash already names another block (two requests computed the same prefix) or the block
        already has a hash."""
        if block_hash in self._block_ids or block_id in self._hashes:
            return False
        self.allocator.mark_cached(block_id)
        self._block_ids[block_hash] = block_id
        self._hashes[block_id] = block_hash
        return True

    def block_hash(self, block_id: int) -> bytes | None:
        return self._hashes.get(block_id)

    def recent_hashes(self, max_blocks: int) -> list[bytes]:
        """Hashes of up to `max_blocks` cached blocks, most recently registered first: what a worker
        publishes for cache-aware routing. O(max_blocks), whatever the cache holds.

        Recency is registration order, so a prefix cached long ago (a shared system prompt) falls out
        of a short summary before the newer blocks chained on it; a router therefore matches a request
        by the deepest of its hashes found, which names the whole prefix before it, not by a run from
        the first block.
        """
        if max_blocks < 0:
            raise ValueError(f"max_blocks must be >= 0, got {max_blocks}")
        return list(itertools.islice(reversed(self._block_ids), max_blocks))

    def _forget(self, block_id: int) -> None:
        del self._block_ids[self._hashes.pop(block_id)]
        self.num_evicted_blocks += 1
