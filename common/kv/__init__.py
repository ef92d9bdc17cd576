"""Paged KV cache: the pool tensor (`kv_pool`) and the pure-Python block allocator."""

from common.kv.block_allocator import BlockAllocator, OutOfKVBlocks
from common.kv.kv_pool import KVLayout, KVPool, num_blocks_for_budget

__all__ = ["BlockAllocator", "OutOfKVBlocks", "KVLayout", "KVPool", "num_blocks_for_budget"]
