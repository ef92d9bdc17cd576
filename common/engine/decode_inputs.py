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

With asynchronous scheduling a sequence's input token may still be in flight (sampled by the step
before, on the device, not yet on the host). Its row names where that token is instead, and a gather
on the device fills it in before the forward runs:

    source_rows [num_seqs] (after the five fields): -1 = input_ids holds the token;
                                                    r  = the token is row r of the previous step's samples
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.engine.sequence import PLACEHOLDER_TOKEN_ID, Sequence

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
        # The five fields, then source_rows: NUM_FIELDS * num_rows + num_seqs entries at most. On CUDA,
        # two staging buffers taken in turn: step N+1 is prepared while step N's copy may still be queued
        # (asynchronous scheduling), but never before step N-1 completed.
        size = (NUM_FIELDS + 1) * max_num_seqs
        num_staging = 2 if is_cuda else 1
        self._staging = [torch.zeros(size, dtype=torch.int64, pin_memory=is_cuda) for _ in range(num_staging)]
        self._num_prepared = 0
        self.flat = torch.zeros(size, dtype=torch.int64, device=device) if is_cuda else self._staging[0]
        self.tables = torch.full((max_num_seqs + 1, max_blocks_per_seq), scratch_block_id, dtype=torch.int32,
                                 device=device)
        self._updates_staging = [torch.empty(0, dtype=torch.int64)] * num_staging
        self._updates_device = torch.empty(0, dtype=torch.int64, device=device)
        # Row bookkeeping (host only): which sequence owns each row, and how much of which list is synced.
        self._row_of: dict[Sequence, int] = {}
        self._synced_table: list[list[int] | None] = [None] * max_num_seqs
        self._synced_count = [0] * max_num_seqs
        self._free_rows = list(range(max_num_seqs - 1, -1, -1))

    @property
    def num_owned_rows(self) -> int:
        return len(self._row_of)

    def prepare(
        self,
        seqs: list[Sequence],
        num_rows: int,
        previous_rows: dict[Sequence, int] | None = None,
        previous_tokens: torch.Tensor | None = None,
    ) -> DecodeBatch:
        """Fills the buffers for one token per sequence, padded to `num_rows`; ships them to the device.

        A sequence whose input token is still a placeholder takes row `previous_rows[seq]` of
        `previous_tokens` ([previous num_seqs] int64, on the device: the step before's samples).
        """
        num_seqs = len(seqs)
        if not 0 < num_seqs <= num_rows <= self.max_num_seqs:
            raise ValueError(f"need 0 < num_seqs ({num_seqs}) <= num_rows ({num_rows}) <= max_num_seqs "
                             f"({self.max_num_seqs})")
        block_size = self.block_size
        input_ids, positions, slots, context_lens, rows, source_rows = [], [], [], [], [], []
        update_index: list[int] = []
        update_values: list[int] = []
        num_in_flight = 0
        for seq in seqs:
            position = seq.num_computed_tokens
            table = seq.block_table
            row = self._sync_row(seq, table, seqs, update_index, update_values)
            token_id = seq.token_ids[position]
            if token_id == PLACEHOLDER_TOKEN_ID:
                if previous_rows is None or seq not in previous_rows:
                    raise ValueError(f"the input token of {seq.request_id!r} is in flight, but not in the "
                                     f"previous step")
                source_rows.append(previous_rows[seq])
                input_ids.append(0)
                num_in_flight += 1
            else:
                source_rows.append(-1)
                input_ids.append(token_id)
            positions.append(position)
            slots.append(table[position // block_size] * block_size + position % block_size)
            context_lens.append(position + 1)
            rows.append(row)
        staging_index = self._num_prepared % len(self._staging)
        self._num_prepared += 1
        staging = self._staging[staging_index]
        host = staging.numpy()
        for field, (values, pad) in enumerate(zip((input_ids, positions, slots, context_lens, rows), self.pad_values)):
            start = field * num_rows
            host[start : start + num_seqs] = values
            host[start + num_seqs : start + num_rows] = pad
        num_staged = NUM_FIELDS * num_rows
        if num_in_flight:
            host[num_staged : num_staged + num_seqs] = source_rows
            num_staged += num_seqs
        if self.flat is not staging:
            self.flat[:num_staged].copy_(staging[:num_staged], non_blocking=True)
        if update_index:
            self._apply_table_updates(update_index, update_values, staging_index)
        views = field_views(self.flat, num_rows)
        if num_in_flight:
            if previous_tokens is None:
                raise ValueError("previous_tokens is required when input tokens are in flight")
            self._fill_in_flight_tokens(views[0][:num_seqs], self.flat[NUM_FIELDS * num_rows : num_staged],
                                        previous_tokens)
        return DecodeBatch(num_seqs, num_rows, max(context_lens), *views)

    @staticmethod
    def _fill_in_flight_tokens(input_ids: torch.Tensor, source_rows: torch.Tensor,
                               previous_tokens: torch.Tensor) -> None:
        """input_ids[i] = previous_tokens[source_rows[i]] where source_rows[i] >= 0 (on the device)."""
        gathered = previous_tokens.index_select(0, source_rows.clamp(min=0))  # [num_seqs]
        input_ids.copy_(torch.where(source_rows >= 0, gathered, input_ids))

    def fill_padding(self, num_rows: int) -> DecodeBatch:
        """Every row padding (graph warm-up and capture run on these harmless inputs)."""
        staging = self._staging[0]  # a blocking copy: nothing else is in flight (warm-up and capture)
        host = staging.numpy()
        for field, pad in enumerate(self.pad_values):
            host[field * num_rows : (field + 1) * num_rows] = pad
        if self.flat is not staging:
            self.flat[: NUM_FIELDS * num_rows].copy_(staging[: NUM_FIELDS * num_rows])
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

    def _apply_table_updates(self, index: list[int], values: list[int], staging_index: int) -> None:
        """tables.flat[index] = values, through one (pinned) staging buffer and one copy."""
        count = len(index)
        is_cuda = self.device.type == "cuda"
        staging = self._updates_staging[staging_index]
        if staging.numel() < 2 * count:
            capacity = 2 * max(count, 1024, staging.numel())
            staging = self._updates_staging[staging_index] = torch.empty(capacity, dtype=torch.int64,
                                                                         pin_memory=is_cuda)
        staged = staging.numpy()
        staged[:count] = index
        staged[count : 2 * count] = values
        if is_cuda:
            if self._updates_device.numel() < 2 * count:
                self._updates_device = torch.empty(staging.numel(), dtype=torch.int64, device=self.device)
            self._updates_device[: 2 * count].copy_(staging[: 2 * count], non_blocking=True)
            device_updates = self._updates_device
        else:
            device_updates = staging
        device_index = device_updates[:count]
        device_values = device_updates[count : 2 * count].to(torch.int32)
        self.tables.view(-1).index_copy_(0, device_index, device_values)
