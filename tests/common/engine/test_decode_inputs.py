"""DecodeInputBuffers: packed fields, padding rows, and the persistent block table kept in sync."""

import pytest
import torch

from common.engine.decode_inputs import DecodeInputBuffers
from common.engine.sampling_params import SamplingParams
from common.engine.sequence import Sequence

BLOCK_SIZE = 4
SCRATCH = 99


def decoding_seq(name: str, num_tokens: int, block_table: list[int]) -> Sequence:
    """A sequence whose newest token (position num_tokens - 1) is the one to decode."""
    seq = Sequence(name, [10 + i for i in range(num_tokens)], SamplingParams())
    seq.block_table = block_table
    seq.num_computed_tokens = num_tokens - 1
    return seq


def make_buffers(max_num_seqs=4, max_blocks_per_seq=8) -> DecodeInputBuffers:
    return DecodeInputBuffers(max_num_seqs, max_blocks_per_seq, BLOCK_SIZE, SCRATCH, torch.device("cpu"))


def assert_rows_hold_tables(buffers, batch, seqs):
    for row, seq in zip(batch.table_rows.tolist(), seqs):
        assert buffers.tables[row, : len(seq.block_table)].tolist() == seq.block_table


def test_fields_are_packed_and_padding_rows_point_at_the_scratch_block():
    buffers = make_buffers()
    a, b = decoding_seq("a", 6, [7, 3]), decoding_seq("b", 1, [5])
    batch = buffers.prepare([a, b], num_rows=3)
    assert (batch.num_seqs, batch.num_rows, batch.max_context_len) == (2, 3, 6)
    assert batch.input_ids.tolist() == [15, 10, 0]
    assert batch.positions.tolist() == [5, 0, 0]
    # position 5 sits in block 1 of a's table (id 3), offset 1; padding writes slot 0 of the scratch block
    assert batch.slot_mapping.tolist() == [3 * BLOCK_SIZE + 1, 5 * BLOCK_SIZE, SCRATCH * BLOCK_SIZE]
    assert batch.context_lens.tolist() == [6, 1, 1]
    pad_row = batch.table_rows.tolist()[2]
    assert pad_row == buffers.pad_row and set(buffers.tables[pad_row].tolist()) == {SCRATCH}
    assert_rows_hold_tables(buffers, batch, [a, b])


def test_growing_tables_ship_only_new_blocks_and_new_lists_rewrite_the_row():
    buffers = make_buffers()
    a, b = decoding_seq("a", 3, [7]), decoding_seq("b", 2, [5])
    shipped = []
    apply = buffers._apply_table_updates
    buffers._apply_table_updates = lambda index, values, staging: (shipped.append(list(values)),
                                                                  apply(index, values, staging))
    buffers.prepare([a, b], 2)
    assert shipped == [[7, 5]]
    for seq in (a, b):  # the next token, same blocks: nothing to ship
        seq.append_token(1)
        seq.num_computed_tokens += 1
    buffers.prepare([a, b], 2)
    assert len(shipped) == 1
    a.block_table += [8]  # in place, as the scheduler grows a table
    a.append_token(1)
    a.num_computed_tokens += 1
    batch = buffers.prepare([a, b], 2)
    assert shipped[-1] == [8] and batch.slot_mapping.tolist()[0] == 8 * BLOCK_SIZE
    a.block_table = [2, 4]  # a new list: preempted and recomputed elsewhere
    batch = buffers.prepare([a, b], 2)
    assert shipped[-1] == [2, 4]
    assert_rows_hold_tables(buffers, batch, [a, b])


def test_rows_of_departed_sequences_are_reused():
    buffers = make_buffers(max_num_seqs=2)
    first = [decoding_seq("a", 3, [1]), decoding_seq("b", 3, [2])]
    buffers.prepare(first, 2)
    second = [decoding_seq("c", 5, [3, 4]), decoding_seq("d", 9, [5, 6, 7])]
    batch = buffers.prepare(second, 2)
    assert sorted(batch.table_rows.tolist()) == [0, 1] and buffers.num_owned_rows == 2
    assert_rows_hold_tables(buffers, batch, second)
    batch = buffers.prepare([first[1], second[1]], 2)  # b comes back: its row is rebuilt
    assert_rows_hold_tables(buffers, batch, [first[1], second[1]])


def test_bad_batches_name_the_problem():
    buffers = make_buffers(max_num_seqs=2, max_blocks_per_seq=2)
    with pytest.raises(ValueError, match="num_rows"):
        buffers.prepare([decoding_seq("a", 2, [1])], num_rows=3)
    with pytest.raises(ValueError, match="max_blocks_per_seq"):
        buffers.prepare([decoding_seq("a", 9, [1, 2, 3])], num_rows=1)


def test_fill_padding_makes_every_row_padding():
    buffers = make_buffers()
    buffers.prepare([decoding_seq("a", 6, [7, 3])], 1)
    batch = buffers.fill_padding(4)
    assert batch.context_lens.tolist() == [1] * 4
    assert batch.table_rows.tolist() == [buffers.pad_row] * 4
    assert batch.slot_mapping.tolist() == [SCRATCH * BLOCK_SIZE] * 4
