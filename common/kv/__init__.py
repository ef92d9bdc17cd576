"""Paged KV cache: its layout, the pool tensor (`kv_pool`) and the pure-Python block allocator.

The pool's names load on first use, so a process that only reads layouts or hashes blocks (the
frontend, a router) imports this package without torch.
"""

from common.kv.block_allocator import BlockAllocator, OutOfKVBlocks
from common.kv.layout import KVLayout
from common.lazy_names import lazy_names

__all__ = ["BlockAllocator", "OutOfKVBlocks", "KVLayout", "KVPool", "num_blocks_for_budget"]
__getattr__ = lazy_names(__name__, {"common.kv.kv_pool": ("KVPool", "num_blocks_for_budget")})
