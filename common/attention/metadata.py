"""What one forward step needs to know to read and write paged KV.

A step packs the new tokens of `num_seqs` sequences into one flat batch of `num_tokens` tokens.
Sequence i owns the packed tokens `query_start_locs[i] : query_start_locs[i + 1]`; they are the
last `query_len_i` positions of a context of `context_lens[i]` tokens (prior KV + the new tokens):

    context of seq i:  [ prior tokens already in KV ........ | new tokens of this step ]
                         positions 0 .. context_len-query_len-1   .. context_len-1

Each new token's K/V is written to the flat slot `slot_mapping[t]`:

    slot = block_id * block_size + offset_in_block
    block_id = block_tables[i][position // block_size],  offset_in_block = position % block_size

A decode step is the special case where every query_len is 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: flat KV slot for each new token
    query_start_locs: torch.Tensor  # [num_seqs + 1] int32: cumulative query lengths, starts at 0
    context_lens: torch.Tensor  # [num_seqs] int32: tokens of KV each sequence attends to (incl. new)
    block_tables: torch.Tensor  # [num_seqs, max_num_blocks] int32: padded with 0, read only below context
    max_query_len: int  # longest query_len in the step
    max_context_len: int  # longest context_len in the step
    is_decode: bool  # every sequence has exactly one new token
    # Host copies, so Python-side loops never synchronise with the device.
    query_start_locs_cpu: list[int] | None = None
    context_lens_cpu: list[int] | None = None

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> "AttentionMetadata":
        """Builds metadata from per-sequence Python lists (positions follow from the lengths)."""
        if not (len(query_lens) == len(context_lens) == len(block_tables)):
            raise ValueError("query_lens, context_lens and block_tables must have one entry per sequence")
        slots: list[int] = []
        starts = [0]
        for query_len, context_len, table in zip(query_lens, context_lens, block_tables):
            if not 0 < query_len <= context_len:
                raise ValueError(f"need 0 < query_len <= context_len, got {query_len} and {context_len}")
            if len(table) * block_size < context_len:
                raise ValueError(f"{len(table)} blocks of {block_size} cannot hold {context_len} tokens")
            for position in range(context_len - query_len, context_len):
                slots.append(table[position // block_size] * block_size + position % block_size)
            starts.append(starts[-1] + query_len)
        max_num_blocks = max(len(t) for t in block_tables)
        padded = [t + [0] * (max_num_blocks - len(t)) for t in block_tables]
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_locs=torch.tensor(starts, dtype=torch.int32, device=device),
            context_lens=torch.tensor(context_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
            is_decode=all(q == 1 for q in query_lens),
            query_start_locs_cpu=starts,
            context_lens_cpu=list(context_lens),
        )
