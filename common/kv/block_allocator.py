"""Pure-Python bookkeeping of the paged KV pool: which blocks are free and who holds the rest.

It never touches tensors: the pool tensor lives in `kv_pool.py`, this class only hands out block ids.
Every block id in `0 .. num_blocks - 1` is usable (no block is reserved for padding: block tables are
padded with 0, but attention only reads a table below each sequence's context length).

Blocks are reference-counted for prefix sharing: `fork` adds a holder, `free` drops one, and a block
returns to the free list when its last holder lets go. A block marked cached (`mark_cached`: its KV is
complete and the prefix cache can find it by hash) goes to the cached-free LRU instead, where `fork`
can revive it; `allocate` takes plain free blocks first and only then evicts the least recently freed
cached block (telling the prefix cache through `on_evict`). Both count as free:

    held (ref >= 1) ──last free──► free list            (not cached)
                    └────────────► cached-free LRU ──fork──► held again
                                         └──allocate (evict, on_evict(b))──► held by someone else

A block may be freed while a step that writes it is still running on the device (asynchronous
scheduling launches step N+1 before step N's tokens are known, so a request that stops at step N
still writes its KV in step N+1). While a fence is set, such blocks wait beside the free list until
that step has completed; only then can another request, or a KV transfer on another stream, get them:

    free(b) with fence = step 7 ──► fenced [(7, b)] ──release_fence(7)──► free list (or cached-free LRU)

A fenced block is neither allocatable nor revivable until its fence is released.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable


class OutOfKVBlocks(RuntimeError):
    """Raised when a request asks for more KV blocks than are free."""

    def __init__(self, num_requested: int, num_free: int):
        super().__init__(f"need {num_requested} KV blocks but only {num_free} are free")
        self.num_requested = num_requested
        self.num_free = num_free


class BlockAllocator:
    """Free list plus reference counts over `num_blocks` fixed-size KV blocks."""

    def __init__(self, num_blocks: int):
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be an int >= 1, got {num_blocks!r}")
        self.num_blocks = num_blocks
        # Freed blocks go to the back and are handed out from the front, so reuse is spread evenly.
        self._free_block_ids: deque[int] = deque(range(num_blocks))
        self._ref_counts = [0] * num_blocks
        self._fence: int | None = None  # the newest step in flight: blocks freed now wait for it
        self._fenced: deque[tuple[int, int]] = deque()  # (step id, block id), step ids ascending
        self._is_cached = [False] * num_blocks  # KV complete and findable by the prefix cache
        self._cached_free: OrderedDict[int, None] = OrderedDict()  # unheld cached blocks, least recent first
        self.on_evict: Callable[[int], None] | None = None  # told when a cached block is evicted

    @property
    def num_cached_free_blocks(self) -> int:
        """Free blocks that still hold cached KV (evicted only when an allocation needs them)."""
        return len(self._cached_free)

    @property
    def num_free_blocks(self) -> int:
        """Allocatable blocks: plain free ones and evictable cached ones."""
        return len(self._free_block_ids) + len(self._cached_free)

    @property
    def num_fenced_blocks(self) -> int:
        """Blocks nobody holds that wait for a step in flight to complete (not yet allocatable)."""
        return len(self._fenced)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks held by someone, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= self.num_free_blocks

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def is_cached(self, block_id: int) -> bool:
        self._check_id(block_id)
        return self._is_cached[block_id]

    def can_fork(self, block_id: int) -> bool:
        """Whether `fork` takes this block: it is held, or cached and free (not fenced)."""
        self._check_id(block_id)
        return self._ref_counts[block_id] > 0 or block_id in self._cached_free

    def allocate(self, num_blocks: int) -> list[int]:
        """Takes `num_blocks` free blocks (reference count 1 each), evicting the least recently freed
        cached blocks once the plain free list is empty; all or nothing."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > self.num_free_blocks:
            raise OutOfKVBlocks(num_blocks, self.num_free_blocks)
        block_ids = []
        for _ in range(num_blocks):
            block_ids.append(self._free_block_ids.popleft() if self._free_block_ids else self._evict())
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def fork(self, block_ids: list[int]) -> list[int]:
        """Adds one holder to each block (held, or cached and free: revived) and returns the same ids."""
        for block_id in block_ids:
            if not self.can_fork(block_id):
                raise ValueError(f"KV block {block_id} is not allocated")
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._cached_free[block_id]
            self._ref_counts[block_id] += 1
        return list(block_ids)

    def mark_cached(self, block_id: int) -> None:
        """A held block's KV is complete and the prefix cache maps a hash to it: when its last holder
        frees it, it waits in the cached-free LRU instead of the free list."""
        self._check_held(block_id)
        self._is_cached[block_id] = True

    def free(self, block_ids: list[int]) -> None:
        """Drops one holder from each block; a block nobody holds goes back to the free list.

        Raises ValueError (and changes nothing) if a block is not held or is listed more times
        than it has holders: that is a double free, always a bug in the caller.
        """
        drops: dict[int, int] = {}
        for block_id in block_ids:
            self._check_id(block_id)
            drops[block_id] = drops.get(block_id, 0) + 1
        for block_id, num_drops in drops.items():
            if self._ref_counts[block_id] < num_drops:
                raise ValueError(f"double free of KV block {block_id}")
        fence = self._fence
        for block_id in block_ids:
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                if fence is None:
                    self._put_back(block_id)
                else:
                    self._fenced.append((fence, block_id))

    def set_fence(self, step_id: int | None) -> None:
        """Blocks freed from now on wait until `release_fence(step_id)`: step `step_id` is in flight and
        may still write them. None: freed blocks go straight back to the free list."""
        if step_id is not None and self._fence is not None and step_id < self._fence:
            raise ValueError(f"fence step ids must not go backwards: {step_id} after {self._fence}")
        self._fence = step_id

    def release_fence(self, step_id: int) -> None:
        """Step `step_id` and every step before it have completed: the blocks they fenced are free."""
        fenced = self._fenced
        while fenced and fenced[0][0] <= step_id:
            self._put_back(fenced.popleft()[1])

    def _put_back(self, block_id: int) -> None:
        """A block nobody holds (and no step in flight writes) becomes allocatable."""
        if self._is_cached[block_id]:
            self._cached_free[block_id] = None  # most recently freed: evicted last
        else:
            self._free_block_ids.append(block_id)

    def _evict(self) -> int:
        block_id, _ = self._cached_free.popitem(last=False)
        self._is_cached[block_id] = False
        if self.on_evict is not None:
            self.on_evict(block_id)
        return block_id

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is outside 0..{self.num_blocks - 1}")

    def _check_held(self, block_id: int) -> None:
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"KV block {block_id} is not allocated")
