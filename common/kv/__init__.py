"""Paged KV cache: its layout, the pool tensor (`kv_pool`) and the pure-Python block allocator.

The pool's names load on first use, so a process that only reads layouts or hashes blocks (the
frontend, a router) imports this package without torch.
"""

from common.kv.block_allocator import BlockAllocator, OutOfKVBlocks
from common.kv.layout import KVLayout

__all__ = ["BlockAllocator", "OutOfKVBlocks", "KVLayout", "KVPool", "num_blocks_for_budget"]
_POOL_NAMES = ("KVPool", "num_blocks_for_budget")


def __getattr__(name: str):
    if name in _POOL_NAMES:
        from common.kv import kv_pool

        return getattr(kv_pool, name)
    raise AttributeError(f"module 'common.kv' has no attribute {name!r}")
