"""The behaviour every backend must share, run against the in-process fake and real UCX (loopback)."""

import time

import pytest
import torch

from common.transfer import (
    KVLayout,
    KVLayoutMismatch,
    KVSizeMismatch,
    KVTransferError,
    KVTransferNotFound,
    KVTransferTimeout,
    TransferOutcome,
    TransferState,
    create_receiver,
    create_sender,
    new_transfer_id,
)

LAYOUT = KVLayout("tiny-llama", "bfloat16", 16, 3, 2, 8)
NUM_POOL_BLOCKS = 40


class Pool:
    """A stand-in KV pool [L, 2, num_blocks, BS, Hkv, D] with random contents."""

    def __init__(self, layout: KVLayout, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        shape = layout.block_shape(NUM_POOL_BLOCKS)
        self.kv = torch.randn(shape, generator=generator).to(layout.torch_dtype)
        self.num_gathers = 0

    def gather_blocks(self, block_ids):
        self.num_gathers += 1
        return self.kv.index_select(2, torch.tensor(block_ids))


@pytest.fixture
def pool():
    return Pool(LAYOUT)


def _destination(layout: KVLayout, num_blocks: int) -> torch.Tensor:
    # Filled with NaN so a transfer that leaves any byte unwritten is caught.
    return torch.full(layout.block_shape(num_blocks), float("nan"), dtype=layout.torch_dtype)


def test_pull_moves_exactly_the_offered_blocks(backend, sender, receiver, pool, releases):
    block_ids = [31, 4, 17, 5, 22]  # scattered, out of order
    handle = sender.offer(new_transfer_id(), block_ids, 70, 10, {"traceparent": "prefill"})
    assert handle.layout == LAYOUT and handle.num_blocks == 5 and handle.address == sender.address
    destination = _destination(LAYOUT, 5)
    ticket = receiver.begin(handle, destination, {"traceparent": "decode"})
    stats = receiver.wait(ticket, timeout=20)

    assert receiver.poll(ticket) is TransferState.DONE
    assert torch.equal(destination, pool.kv[:, :, block_ids])
    assert stats.num_bytes == 3 * 2 * 5 * 16 * 2 * 8 * 2 == 5 * LAYOUT.bytes_per_block
    assert stats.num_blocks == 5 and stats.seconds > 0 and stats.gbps > 0
    assert stats.transport == ("fake" if backend == "fake" else "tcp")
    transfer_id, outcome, sender_stats = releases.get(timeout=10)
    assert (transfer_id, outcome) == (handle.transfer_id, TransferOutcome.DONE)
    assert sender_stats.num_bytes == stats.num_bytes
    assert sender_stats.trace_context == {"traceparent": "prefill"}
    assert sender_stats.peer_trace_context == {"traceparent": "decode"}
    assert sender.num_pending == 0


def test_layout_mismatch_names_block_size_and_leaves_the_offer(backend, sender, receiver, pool, releases):
    decode_layout = KVLayout("tiny-llama", "bfloat16", 32, 3, 2, 8)
    mismatched = create_receiver(backend, decode_layout)
    try:
        handle = sender.offer(new_transfer_id(), [1, 2], 20, 10)
        ticket = mismatched.begin(handle, _destination(decode_layout, 2))
        with pytest.raises(KVLayoutMismatch, match="block_size: prefill=16 decode=32"):
            mismatched.wait(ticket, timeout=20)
        assert mismatched.poll(ticket) is TransferState.FAILED and isinstance(ticket.error, KVLayoutMismatch)
    finally:
        mismatched.close()
    assert sender.num_pending == 1 and releases.empty()  # a refused pull does not consume the offer
    destination = _destination(LAYOUT, 2)
    receiver.begin(handle, destination).wait(20)  # the matching receiver still gets it
    assert torch.equal(destination, pool.kv[:, :, [1, 2]])
    assert releases.get(timeout=10)[:2] == (handle.transfer_id, TransferOutcome.DONE)


def test_block_count_mismatch_is_refused_and_leaves_the_offer(sender, receiver, releases):
    handle = sender.offer(new_transfer_id(), [1, 2, 3], 40, 10)
    lying = type(handle)(handle.transfer_id, handle.address, 20, 2, handle.layout)
    ticket = receiver.begin(lying, _destination(LAYOUT, 2))
    with pytest.raises(KVSizeMismatch, match="num_blocks: prefill=3 decode=2"):
        ticket.wait(20)
    assert sender.num_pending == 1 and releases.empty()
    receiver.begin(handle, _destination(LAYOUT, 3)).wait(20)
    assert releases.get(timeout=10)[:2] == (handle.transfer_id, TransferOutcome.DONE)


def test_unknown_transfer_id_is_not_found(sender, receiver, releases):
    handle = sender.offer(new_transfer_id(), [1], 4, 10)
    unknown = type(handle)(new_transfer_id(), handle.address, 4, 1, handle.layout)
    with pytest.raises(KVTransferNotFound):
        receiver.begin(unknown, _destination(LAYOUT, 1)).wait(20)
    assert sender.num_pending == 1 and releases.empty()  # the real offer is untouched


def test_expired_lease_releases_and_a_later_pull_is_not_found(sender, receiver, pool, releases):
    handle = sender.offer(new_transfer_id(), [6, 7], 30, lease_seconds=0.2)
    assert releases.get(timeout=10)[:2] == (handle.transfer_id, TransferOutcome.EXPIRED)
    with pytest.raises(KVTransferNotFound):
        receiver.begin(handle, _destination(LAYOUT, 2)).wait(20)
    assert pool.num_gathers == 0


def test_a_transfer_can_be_pulled_only_once(sender, receiver, releases):
    handle = sender.offer(new_transfer_id(), [8], 16, 10)
    receiver.begin(handle, _destination(LAYOUT, 1)).wait(20)
    with pytest.raises(KVTransferNotFound):
        receiver.begin(handle, _destination(LAYOUT, 1)).wait(20)
    assert releases.get(timeout=10)[1] is TransferOutcome.DONE


def test_cancelled_offer_is_released_and_not_found(sender, receiver, releases):
    handle = sender.offer(new_transfer_id(), [9], 3, 10)
    assert sender.cancel(handle.transfer_id) and not sender.cancel(handle.transfer_id)
    assert releases.get(timeout=10)[:2] == (handle.transfer_id, TransferOutcome.CANCELLED)
    with pytest.raises(KVTransferNotFound):
        receiver.begin(handle, _destination(LAYOUT, 1)).wait(20)


def test_many_concurrent_pulls_share_one_endpoint(backend, sender, receiver, pool, releases):
    num_transfers = 16
    generator = torch.Generator().manual_seed(1)
    jobs = []
    for index in range(num_transfers):
        num_blocks = 1 + index % 4
        block_ids = torch.randperm(NUM_POOL_BLOCKS, generator=generator)[:num_blocks].tolist()
        handle = sender.offer(new_transfer_id(), block_ids, num_blocks * 16, 30)
        destination = _destination(LAYOUT, num_blocks)
        jobs.append((block_ids, destination, receiver.begin(handle, destination)))
    for block_ids, destination, ticket in jobs:
        assert ticket.wait(30).num_bytes == len(block_ids) * LAYOUT.bytes_per_block
        assert torch.equal(destination, pool.kv[:, :, block_ids])
    outcomes = [releases.get(timeout=10)[1] for _ in range(num_transfers)]
    assert outcomes == [TransferOutcome.DONE] * num_transfers
    if backend == "ucx":
        assert list(receiver._endpoints) == [sender.address]  # connected once, reused


def test_failing_gather_fails_the_pull_and_the_offer(backend, releases):
    def broken_gather(block_ids):
        raise RuntimeError("device lost")

    sender = create_sender(backend, LAYOUT, broken_gather, lambda *args: releases.put(args))
    receiver = create_receiver(backend, LAYOUT)
    try:
        handle = sender.offer(new_transfer_id(), [1], 3, 10)
        with pytest.raises(KVTransferError, match="device lost"):
            receiver.begin(handle, _destination(LAYOUT, 1)).wait(20)
        assert releases.get(timeout=10)[:2] == (handle.transfer_id, TransferOutcome.FAILED)
    finally:
        receiver.close()
        sender.close()


def test_a_pull_slower_than_the_receiver_timeout_fails_on_both_sides(backend, pool, releases):
    def slow_gather(block_ids):
        time.sleep(1.0)
        return pool.gather_blocks(block_ids)

    sender = create_sender(backend, LAYOUT, slow_gather, lambda *args: releases.put(args), ack_timeout_seconds=5)
    receiver = create_receiver(backend, LAYOUT, timeout_seconds=0.3)
    try:
        handle = sender.offer(new_transfer_id(), [1], 3, 10)
        with pytest.raises(KVTransferTimeout):
            receiver.begin(handle, _destination(LAYOUT, 1)).wait(20)
        assert releases.get(timeout=10)[:2] == (handle.transfer_id, TransferOutcome.FAILED)
    finally:
        receiver.close()
        sender.close()


def test_close_cancels_pending_offers(backend, pool, releases):
    sender = create_sender(backend, LAYOUT, pool.gather_blocks, lambda *args: releases.put(args))
    ids = [sender.offer(new_transfer_id(), [i], 1, 60).transfer_id for i in range(3)]
    sender.close()
    assert sorted(releases.get_nowait()[:2] for _ in ids) == sorted((i, TransferOutcome.CANCELLED) for i in ids)


def test_a_port_in_use_is_refused(backend, sender, pool):
    port = int(sender.address.rpartition(":")[2])
    host = sender.address.rpartition(":")[0]
    with pytest.raises(KVTransferError, match=f"port: cannot listen on {port}"):
        create_sender(backend, LAYOUT, pool.gather_blocks, lambda *args: None, host=host, port=port)


def test_pull_from_an_address_nobody_serves_fails_cleanly(backend, sender):
    receiver = create_receiver(backend, LAYOUT, timeout_seconds=20, connect_timeout_seconds=1)
    handle = sender.offer(new_transfer_id(), [1], 3, 10)
    address = "fake:65000" if backend == "fake" else "127.0.0.1:1"
    nowhere = type(handle)(handle.transfer_id, address, 3, 1, handle.layout)
    try:
        with pytest.raises(KVTransferError, match="cannot connect"):
            receiver.begin(nowhere, _destination(LAYOUT, 1)).wait(20)
    finally:
        receiver.close()


@pytest.mark.parametrize(
    "destination, match",
    [
        (torch.empty(3, 2, 2, 16, 2, 8, dtype=torch.bfloat16), "shape"),
        (torch.empty(3, 2, 1, 16, 2, 8, dtype=torch.float16), "dtype"),
        (torch.empty(3, 2, 1, 16, 8, 2, dtype=torch.bfloat16).transpose(-1, -2), "contiguous"),
    ],
)
def test_bad_destination_raises_value_error_at_begin(sender, receiver, destination, match):
    handle = sender.offer(new_transfer_id(), [1], 3, 10)
    with pytest.raises(ValueError, match=match):
        receiver.begin(handle, destination)
    assert sender.num_pending == 1


@pytest.mark.parametrize("address", ["no-port", "host:0", "host:99999", ":80"])
def test_malformed_address_raises_value_error_at_begin(sender, receiver, address):
    handle = sender.offer(new_transfer_id(), [1], 3, 10)
    malformed = type(handle)(handle.transfer_id, address, 3, 1, handle.layout)
    with pytest.raises(ValueError, match="address"):
        receiver.begin(malformed, _destination(LAYOUT, 1))


class _Gate:
    """Stands in for the CUDA event of a gather still running on the device."""

    def __init__(self):
        self.is_open = False

    def query(self) -> bool:
        return self.is_open

    def synchronize(self) -> None:
        while not self.is_open:
            time.sleep(0.001)


def test_a_gather_still_on_the_device_is_polled_while_other_pulls_are_served(backend, pool, releases):
    """The sender's gather may return a buffer still being filled: its pull waits for it without
    holding up a pull whose blocks are ready, and then moves the right bytes."""
    from common.kv.kv_pool import TransferBuffer

    gates: dict[int, _Gate] = {}

    def start_gather(block_ids):
        gate = gates.setdefault(block_ids[0], _Gate() if block_ids[0] == 7 else None)
        return TransferBuffer(pool.kv.index_select(2, torch.tensor(block_ids)), gate)

    if backend == "fake":
        gates[7] = _Gate()
        gates[7].is_open = True  # the fake sender copies on the receiver's thread: it waits, it cannot poll
    sender = create_sender(backend, LAYOUT, start_gather, lambda *args: releases.put(args), ack_timeout_seconds=5)
    receiver = create_receiver(backend, LAYOUT, timeout_seconds=20)
    try:
        slow = receiver.begin(sender.offer(new_transfer_id(), [7, 8], 32, 30), _destination(LAYOUT, 2))
        fast = receiver.begin(sender.offer(new_transfer_id(), [3], 16, 30), _destination(LAYOUT, 1))
        receiver.wait(fast, 20)
        if backend == "ucx":
            assert slow.state is TransferState.PENDING  # its gather has not finished
            gates[7].is_open = True
        receiver.wait(slow, 20)
        assert torch.equal(slow.destination, pool.kv[:, :, [7, 8]])
        assert torch.equal(fast.destination, pool.kv[:, :, [3]])
    finally:
        receiver.close()
        sender.close()
