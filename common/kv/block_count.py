"""How many KV blocks a run of tokens fills (pure Python: routers and schedulers count blocks too)."""

from __future__ import annotations


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold `num_tokens` tokens, the last one possibly partial: ceil(num_tokens / block_size)."""
    return -(-num_tokens // block_size)
