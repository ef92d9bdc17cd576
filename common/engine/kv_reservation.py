"""What `LLMEngine.reserve_kv` hands a decode worker: the blocks a prompt's KV goes into before it arrives.

With prefix caching the leading blocks may already be on this worker (an earlier turn of the same
conversation was decoded here): those are reused, and only the rest is pulled from the prefill worker.

    block_ids:  [ reused (forked from the prefix cache) | pulled (new; the hand-off fills them) ]
                  0 .. num_reused_blocks - 1              num_reused_blocks .. len(block_ids) - 1
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KVReservation:
    block_ids: list[int]  # every block of the prompt, in position order
    num_reused_blocks: int  # leading blocks whose KV this worker already holds: never pulled
    block_size: int  # tokens per block
    prompt_token_ids: list[int]  # the prompt the blocks are for; add_decode_request must name the same
    block_hashes: list[bytes]  # chained hashes of the prompt's full blocks (common/kv/block_hash.py)

    @property
    def pulled_block_ids(self) -> list[int]:
        """The blocks the hand-off fills: [L, 2, len(pulled_block_ids), BS, Hkv, D] arrive for them."""
        return self.block_ids[self.num_reused_blocks:]

    @property
    def num_pulled_blocks(self) -> int:
        return len(self.block_ids) - self.num_reused_blocks

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens whose KV was reused (not transferred)."""
        return self.num_reused_blocks * self.block_size
