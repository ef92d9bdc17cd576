"""Decode-step inputs with minimal host work: one staging buffer, one copy, block tables kept on the device.

Every running sequence owns a row of a persistent device block table for as long as it decodes; a
step only ships what changed (a new block every `block_size` steps, a whole row when a sequence
joins or was preempted), never the whole table:

    persistent tables [max_num_seqs + 1, max_blocks_per_seq] int32 (device)
        row r:  block ids of the sequence that owns row r, in position order
        row max_num_seqs: the padding row, every entry the reserved scratch block

The per-step fields go through one host buffer of 5 x num_rows int64 and one non_blocking copy:

    flat  [ input_ids | positions | slot_mapping | context_lens | table_rows ]   each num_rows long
           ^ 0          ^ B         ^ 2B           ^ 3B           ^ 4B          (B = num_rows)

Rows num_seqs .. num_rows-1 are padding for a CUDA graph captured at B rows: token 0 at position 0,
KV written to slot 0 of the scratch block, context length 1 read from that same block. They never
touch a block a sequence owns, and their outputs are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.engine.sequence import Sequence

NUM_FIELDS = 5  # input_ids, positions, slot_mapping, context_lens, table_rows


@dataclass
class DecodeBatch:
    """Device views of one decode step's inputs (valid until the next `prepare`)."""

    num_seqs: int  # real sequences; rows past them are padding
    num_rows: int  # rows the forward computes (a captured graph's batch size, or num_seqs)
    max_context_len: int  # longest context among the real sequences (host int)
    input_ids: torch.Tensor  # [num_rows] int64: each sequence's newest token
    positions: torch.Tensor  # [num_rows] int64: its position (= context_len - 1)
    slot_mapping: torch.Tensor  # [num_rows] int64: flat KV slot the new token's K/V goes to
    context_lens: torch.Tensor  # [num_rows] int64: tokens attended to, the new one included
    table_rows: torch.Tensor  # [num_rows] int64: row of the persistent block table of each sequence


def field_views(flat: torch.Tensor, num_rows: int) -> list[torch.Tensor]:
    """The five [num_rows] fields packed at the front of `flat` (see the module docstring)."""
    return [flat[i * num_rows : (i + 1) * num_rows] for i in range(NUM_FIELDS)]


class DecodeInputBuffers:
    """Owns the staging buffers and the persistent block table; `prepare` fills them for one step."""

    def __init__(
        self,
        max_num_seqs: int,
        max_blocks_per_seq: int,
        block_size: int,
        scratch_block_id: int,
        device: torch.device,
    ):
        if max_num_seqs < 1 or max_blocks_per_seq < 1:
            raise ValueError(f"max_num_seqs and max_blocks_per_seq must be >= 1, got {max_num_seqs}, "
                             f"{max_blocks_per_seq}")
        self.max_num_seqs = max_num_seqs
        self.max_blocks_per_seq = max_blocks_per_seq
        self.block_size = block_size
        self.device = device
        self.pad_row = max_num_seqs
        self.pad_values = (0, 0, scratch_block_id * block_size, 1, self.pad_row)  # one per field
        is_cuda = device.type == "cuda"
        self._host = torch.zeros(NUM_FIELDS * max_num_seqs, dtype=torch.int64, pin_memory=is_cuda)
        self._host_np = self._host.numpy()
        self.flat = torch.zeros_like(self._host, device=device) if is_cuda else self._host
        self.tables = torch.full((max_num_seqs + 1, max_blocks_per_seq), scratch_block_id, dtype=torch.int32,
                                 device=device)
        self._updates_host = torch.empty(0, dtype=torch.int64)
        self._updates_device = self._updates_host
        # Row bookkeeping (host only): which sequence owns each row, and how much of which list is synced.
        self._row_of: dict[Sequence, int] = {}
        self._synced_table: list[list[int] | None] = [None] * max_num_seqs
        self._synced_count = [0] * max_num_seqs
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))

    @property
    def num_owned_rows(self) -> int:
        return len(self._row_of)

    def prepare(self, seqs: list[Sequence], num_rows: int) -> DecodeBatch:
        """Fills the buffers for one token per sequence, padded to `num_rows`; ships them to the device."""
        num_seqs = len(seqs)
        if not 0 < num_seqs <= num_rows <= self.max_num_seqs:
            raise ValueError(f"need 0 < num_seqs ({num_seqs}) <= num_rows ({num_rows}) <= max_num_seqs "
                             f"({self.max_num_seqs})")
        block_size = self.block_size
        input_ids, positions, slots, context_lens, rows = [], [], [], [], []
        update_index: list[int] = []
        update_values: list[int] = []
        for seq in seqs:
            position = seq.num_computed_tokens
            table = seq.block_table
            row = self._sync_row(seq, table, seqs, update_index, update_values)
            input_ids.append(seq.token_ids[position])
            positions.append(position)
            slots.append(table[position // block_size] * block_size + position % block_size)
            context_lens.append(position + 1)
            rows.append(row)
        host = self._host_np
        for field, (values, pad) in enumerate(zip((input_ids, positions, slots, context_lens, rows), self.pad_values)):
            start = field * num_rows
            host[start : start + num_seqs] = values
            host[start + num_seqs : start + num_rows] = pad
        if self.flat is not self._host:
            self.flat[: NUM_FIELDS * num_rows].copy_(self._host[: NUM_FIELDS * num_rows], non_blocking=True)
        if update_index:
            self._apply_table_updates(update_index, update_values)
        views = field_views(self.flat, num_rows)
        return DecodeBatch(num_seqs, num_rows, max(context_lens), *views)

    def fill_padding(self, num_rows: int) -> DecodeBatch:
        """Every row padding (graph warm-up and capture run on these harmless inputs)."""
        host = self._host_np
        for field, pad in enumerate(self.pad_values):
            host[field * num_rows : (field + 1) * num_rows] = pad
        if self.flat is not self._host:
            self.flat[: NUM_FIELDS * num_rows].copy_(self._host[: NUM_FIELDS * num_rows])
        return DecodeBatch(0, num_rows, 1, *field_views(self.flat, num_rows))

    def _sync_row(self, seq, table, seqs, update_index, update_values) -> int:
        """The sequence's row; queues the entries of its block table the device row lacks."""
        row = self._row_of.get(seq)
        if row is None:
            if not self._free_rows:
                self._reclaim_rows(seqs)
            row = self._free_rows.pop()
            self._row_of[seq] = row
            self._synced_table[row] = None
        if self._synced_table[row] is not table:  # a new list: joined, preempted, or handed off
            self._synced_table[row] = table
            self._synced_count[row] = 0
        count, num_blocks = self._synced_count[row], len(table)
        if num_blocks > count:
            if num_blocks > self.max_blocks_per_seq:
                raise ValueError(f"sequence {seq.request_id!r} holds {num_blocks} blocks, more than "
                                 f"max_blocks_per_seq {self.max_blocks_per_seq}")
            base = row * self.max_blocks_per_seq
            update_index.extend(range(base + count, base + num_blocks))
            update_values.extend(table[count:num_blocks])
            self._synced_count[row] = num_blocks
        return row

    def _reclaim_rows(self, seqs: list[Sequence]) -> None:
        """Frees the rows of sequences that are not in this step (finished, aborted or preempted)."""
        live = set(seqs)
        for seq in [s for s in self._row_of if s not in live]:
            row = self._row_of.pop(seq)
            self._synced_table[row] = None
            self._free_rows.append(row)

    def _apply_table_updates(self, index: list[int], values: list[int]) -> None:
        """tables.flat[index] = values, through one (pinned) staging buffer and one copy."""
        count = len(index)
        if self._updates_host.numel() < 2 * count:
            capacity = 2 * max(count, 1024, self._updates_host.numel())
            is_cuda = self.device.type == "cuda"
            self._updates_host = torch.empty(capacity, dtype=torch.int64, pin_memory=is_cuda)
            self._updates_device = torch.empty_like(self._updates_host, device=self.device) if is_cuda \
                else self._updates_host
        staged = self._updates_host.numpy()
        staged[:count] = index
        staged[count : 2 * count] = values
        if self._updates_device is not self._updates_host:
            self._updates_device[: 2 * count].copy_(self._updates_host[: 2 * count], non_blocking=True)
        device_index = self._updates_device[:count]
        device_values = self._updates_device[count : 2 * count].to(torch.int32)
        self.tables.view(-1).index_copy_(0, device_index, device_values)
