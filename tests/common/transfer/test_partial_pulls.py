"""Partial pulls: a receiver that holds an offer's first blocks pulls only the rest, on both backends;
the sender validates the block range strictly and gathers only what it sends."""

import pytest
import torch

from common.kv.block_hash import full_block_hashes
from common.transfer import (
    KVHandle,
    KVSizeMismatch,
    TransferOutcome,
    TransferState,
    create_receiver,
    create_sender,
    new_transfer_id,
)
from common.transfer import protocol
from common.transfer.offers import OfferBook
from tests.common.transfer.test_transfer_backends import LAYOUT, Pool


class RecordingPool(Pool):
    """A Pool that remembers which block ids each gather asked for."""

    def __init__(self, layout):
        super().__init__(layout, seed=3)
        self.gathered_block_ids: list[list[int]] = []

    def gather_blocks(self, block_ids):
        self.gathered_block_ids.append(list(block_ids))
        return super().gather_blocks(block_ids)


@pytest.fixture
def pool():
    return RecordingPool(LAYOUT)


def _destination(num_blocks: int) -> torch.Tensor:
    return torch.full(LAYOUT.block_shape(num_blocks), float("nan"), dtype=LAYOUT.torch_dtype)


@pytest.mark.parametrize("first_block_index", [1, 4])
def test_a_partial_pull_moves_and_gathers_only_the_blocks_after_the_first_index(
        sender, receiver, pool, releases, first_block_index):
    block_ids = [31, 4, 17, 5, 22]
    handle = sender.offer(new_transfer_id(), block_ids, 75, 10)
    num_pulled = len(block_ids) - first_block_index
    destination = _destination(num_pulled)
    stats = receiver.begin(handle, destination, first_block_index=first_block_index).wait(20)

    assert torch.equal(destination, pool.kv[:, :, block_ids[first_block_index:]])
    assert pool.gathered_block_ids == [block_ids[first_block_index:]]  # the held blocks are never read
    assert stats.num_blocks == num_pulled and stats.num_reused_blocks == first_block_index
    assert stats.num_bytes == num_pulled * LAYOUT.bytes_per_block
    transfer_id, outcome, sender_stats = releases.get(timeout=10)
    assert (transfer_id, outcome) == (handle.transfer_id, TransferOutcome.DONE)  # the ack frees the whole offer
    assert (sender_stats.num_blocks, sender_stats.num_reused_blocks) == (num_pulled, first_block_index)
    assert sender_stats.num_bytes == stats.num_bytes and sender.num_pending == 0


def test_a_range_that_does_not_end_at_the_offers_last_block_is_refused_and_leaves_the_offer(
        sender, receiver, pool, releases):
    handle = sender.offer(new_transfer_id(), [1, 2, 3], 40, 10)
    # a handle claiming 4 blocks: from block 2 the pull asks for 2, which would run past the offer
    lying = KVHandle(handle.transfer_id, handle.address, 64, 4, handle.layout)
    ticket = receiver.begin(lying, _destination(2), first_block_index=2)
    with pytest.raises(KVSizeMismatch, match="num_blocks: prefill=3 decode=2 from block 2"):
        ticket.wait(20)
    assert receiver.poll(ticket) is TransferState.FAILED
    assert sender.num_pending == 1 and releases.empty() and pool.gathered_block_ids == []
    destination = _destination(1)
    receiver.begin(handle, destination, first_block_index=2).wait(20)
    assert torch.equal(destination, pool.kv[:, :, [3]])
    assert releases.get(timeout=10)[:2] == (handle.transfer_id, TransferOutcome.DONE)


@pytest.mark.parametrize("first_block_index, num_destination_blocks, match", [
    (3, 0, "first_block_index"),  # nothing left to pull: a pull always takes the last block
    (-1, 4, "first_block_index"),
    (1, 3, "shape"),  # the destination must hold exactly the pulled blocks
])
def test_a_bad_first_block_index_or_destination_raises_value_error_at_begin(
        sender, receiver, releases, first_block_index, num_destination_blocks, match):
    handle = sender.offer(new_transfer_id(), [1, 2, 3], 40, 10)
    with pytest.raises(ValueError, match=match):
        receiver.begin(handle, _destination(num_destination_blocks), first_block_index=first_block_index)
    assert sender.num_pending == 1 and releases.empty()
    assert sender.cancel(handle.transfer_id)


def test_the_handle_carries_the_full_blocks_hashes(sender):
    token_ids = list(range(100, 140))  # 40 tokens: 2 full blocks of 16 and a partial one
    hashes = full_block_hashes(token_ids, LAYOUT.block_size)
    handle = sender.offer(new_transfer_id(), [1, 2, 3], 40, 10, block_hashes=hashes)
    assert handle.block_hashes == tuple(hashes) and len(hashes) == 2
    with pytest.raises(ValueError, match="block_hashes: 3 hashes, the 40 tokens fill 2 blocks"):
        sender.offer(new_transfer_id(), [4, 5, 6], 40, 10, block_hashes=hashes + hashes[:1])
    with pytest.raises(ValueError, match="block_hashes: each hash must be 16 bytes"):
        sender.offer(new_transfer_id(), [4, 5, 6], 40, 10, block_hashes=[hashes[0], b"short"])
    assert sender.num_pending == 1  # refused offers hold nothing


def test_the_block_range_survives_the_wire_format():
    handle = KVHandle(new_transfer_id(), "h:1", 40, 3, LAYOUT)
    pull = protocol.new_pull(handle, LAYOUT, {}, first_block_index=2)
    assert (pull.first_block_index, pull.expected_num_blocks, pull.expected_bytes) == (2, 1, LAYOUT.bytes_per_block)
    message = protocol.decode_frame(protocol.encode_frame(protocol.pull_to_message(pull)))
    assert protocol.pull_from_message(message.pull_request) == pull


@pytest.mark.parametrize("first_block_index, num_blocks, accepted", [
    (0, 3, True), (2, 1, True), (1, 1, False), (0, 2, False), (3, 0, False), (2, 2, False),
])
def test_the_offer_book_accepts_only_ranges_that_end_at_the_last_block(
        releases, first_block_index, num_blocks, accepted):
    book = OfferBook(LAYOUT, lambda *args: releases.put(args), ack_timeout_seconds=5)
    try:
        transfer_id = new_transfer_id()
        book.add(transfer_id, [7, 8, 9], 40, 10, None)
        claim = lambda: book.claim(transfer_id, LAYOUT, num_blocks, num_blocks * LAYOUT.bytes_per_block,  # noqa: E731
                                   first_block_index)
        if accepted:
            assert claim().block_ids == [7, 8, 9]
        else:
            with pytest.raises(Exception) as raised:
                claim()
            assert type(raised.value).__name__ in ("KVSizeMismatch", "KVInvalidPull")
            assert book.num_pending == 1 and releases.empty()
    finally:
        book.close()
