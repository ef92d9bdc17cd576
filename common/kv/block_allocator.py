"""Pure-Python bookkeeping of the paged KV pool: which blocks are free and who holds the rest.

It never touches tensors: the pool tensor lives in `kv_pool.py`, this class only hands out block ids.
Every block id in `0 .. num_blocks - 1` is usable (no block is reserved for padding: block tables are
padded with 0, but attention only reads a table below each sequence's context length).

Blocks are reference-counted so that prefix sharing can come later: `fork` adds a holder, `free`
drops one, and a block returns to the free list when its last holder lets go.
"""

from __future__ import annotations

from collections import deque


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

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_block_ids)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by someone, in [0, 1]."""
        return self.num_used_blocks / self.num_blocks

    def can_allocate(self, num_blocks: int) -> bool:
        return 0 <= num_blocks <= len(self._free_block_ids)

    def ref_count(self, block_id: int) -> int:
        self._check_id(block_id)
        return self._ref_counts[block_id]

    def allocate(self, num_blocks: int) -> list[int]:
        """Takes `num_blocks` free blocks (reference count 1 each); all or nothing."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks > len(self._free_block_ids):
            raise OutOfKVBlocks(num_blocks, len(self._free_block_ids))
        block_ids = [self._free_block_ids.popleft() for _ in range(num_blocks)]
        for block_id in block_ids:
            self._ref_counts[block_id] = 1
        return block_ids

    def fork(self, block_ids: list[int]) -> list[int]:
        """Adds one holder to each (already held) block and returns the same ids."""
        for block_id in block_ids:
            self._check_held(block_id)
        for block_id in block_ids:
            self._ref_counts[block_id] += 1
        return list(block_ids)

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
        for block_id in block_ids:
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] == 0:
                self._free_block_ids.append(block_id)

    def _check_id(self, block_id: int) -> None:
        if not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id} is outside 0..{self.num_blocks - 1}")

    def _check_held(self, block_id: int) -> None:
        self._check_id(block_id)
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"KV block {block_id} is not allocated")
