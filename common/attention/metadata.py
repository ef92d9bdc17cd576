"""What one forward step needs to know to read and write paged KV.

A step packs the new tokens of `num_seqs` sequences into one flat batch of `num_tokens` tokens.
Sequence i owns the packed tokens `query_start_locs[i] : query_start_locs[i + 1]`; they are the
last `query_len_i` positions of a context of `context_lens[i]` tokens (prior KV + the new tokens):

    context of seq i:  [ prior tokens already in KV ........ | new tokens of this step ]
                         positions 0 .. context_len-query_len-1   .. context_len-1

Each new token's K/V is written to the flat slot `slot_mapping[t]`:

    slot = block_id * block_size + offset_in_block
    block_id = block_tables[i][position // block_size],  offset_in_block = position % block_size

A decode step is the special case where every query_len is 1. A mixed step puts running decodes
first; attention then splits in two, each part with metadata of its own (its own packed rows):

    packed tokens:  [ d0 | d1 | d2 | chunk of prompt A ...... | chunk of prompt B .. ]
                    <-- decode_part -->< prefill_part (query_start_locs from 0) ---->
                     num_decode_tokens = 3: the decode kernel; the rest: the prefill kernel
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

INT64_PER_16_BYTES = 2  # each uploaded field starts 16-byte aligned, as a fresh tensor would (Triton specialises on it)


def upload_index_lists(fields: Sequence[tuple[Sequence[int], torch.dtype]], device: torch.device | str
                       ) -> list[torch.Tensor]:
    """Host int lists -> 1-D tensors of the given dtypes on `device`.

    On CUDA they travel as one pinned buffer in one copy that does not block the host: a copy from
    pageable memory (torch.tensor(..., device=cuda)) waits for every step already queued, which would
    undo asynchronous scheduling. Pinned buffers come from torch's caching host allocator, which reuses
    one only after its copy completed.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return [torch.tensor(values, dtype=dtype, device=device) for values, dtype in fields]
    offsets, total = [], 0
    for values, _ in fields:
        offsets.append(total)
        total += -(-len(values) // INT64_PER_16_BYTES) * INT64_PER_16_BYTES
    staging = torch.empty(max(total, 1), dtype=torch.int64, pin_memory=True)
    host = staging.numpy()
    for (values, _), offset in zip(fields, offsets):
        host[offset : offset + len(values)] = values
    flat = staging.to(device, non_blocking=True)
    return [flat[offset : offset + len(values)].to(dtype) for (values, dtype), offset in zip(fields, offsets)]


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
    # Mixed steps only: the leading one-token sequences (the decode path) and the rest (the prefill path).
    decode_part: "AttentionMetadata | None" = None
    prefill_part: "AttentionMetadata | None" = None

    @property
    def num_seqs(self) -> int:
        return self.context_lens.shape[0]

    @property
    def is_mixed(self) -> bool:
        return self.decode_part is not None

    @property
    def num_decode_tokens(self) -> int:
        """Leading packed tokens that are one-token queries of their own sequences (0 unless mixed)."""
        return 0 if self.decode_part is None else self.decode_part.num_seqs

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str = "cpu",
        num_decode_seqs: int = 0,
    ) -> "AttentionMetadata":
        """Builds metadata from per-sequence Python lists (positions follow from the lengths).

        num_decode_seqs > 0 makes a mixed step: that many leading sequences, each with one new token,
        take the decode path and the others the prefill path (`decode_part`, `prefill_part`)."""
        if not (len(query_lens) == len(context_lens) == len(block_tables)):
            raise ValueError("query_lens, context_lens and block_tables must have one entry per sequence")
        if not 0 <= num_decode_seqs <= len(query_lens) or any(q != 1 for q in query_lens[:num_decode_seqs]):
            raise ValueError(f"num_decode_seqs {num_decode_seqs} must count leading sequences of one new token "
                             f"each, got query_lens {query_lens[:num_decode_seqs + 1]}...")
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
        metadata = cls._from_lists(slots, starts, query_lens, context_lens, block_tables, device)
        if 0 < num_decode_seqs < len(query_lens) and not metadata.is_decode:
            split = num_decode_seqs
            metadata.decode_part = cls(
                slot_mapping=metadata.slot_mapping[:split],
                query_start_locs=metadata.query_start_locs[: split + 1],
                context_lens=metadata.context_lens[:split],
                block_tables=metadata.block_tables[:split],
                max_query_len=1,
                max_context_len=max(context_lens[:split]),
                is_decode=True,
                query_start_locs_cpu=starts[: split + 1],
                context_lens_cpu=list(context_lens[:split]),
            )
            # Fresh tensors, not views at an offset: kernels see them aligned as in any prefill step.
            metadata.prefill_part = cls._from_lists(slots[split:], [start - split for start in starts[split:]],
                                                    query_lens[split:], context_lens[split:], block_tables[split:],
                                                    device)
        return metadata

    @classmethod
    def _from_lists(cls, slots, starts, query_lens, context_lens, block_tables, device) -> "AttentionMetadata":
        max_num_blocks = max(len(t) for t in block_tables)
        padded = [entry for t in block_tables for entry in t + [0] * (max_num_blocks - len(t))]
        slot_mapping, query_start_locs, context_lens_tensor, flat_tables = upload_index_lists(
            [(slots, torch.int64), (starts, torch.int32), (context_lens, torch.int32), (padded, torch.int32)], device)
        return cls(
            slot_mapping=slot_mapping,
            query_start_locs=query_start_locs,
            context_lens=context_lens_tensor,
            block_tables=flat_tables.view(len(block_tables), max_num_blocks),
            max_query_len=max(query_lens),
            max_context_len=max(context_lens),
            is_decode=all(q == 1 for q in query_lens),
            query_start_locs_cpu=starts,
            context_lens_cpu=list(context_lens),
        )
