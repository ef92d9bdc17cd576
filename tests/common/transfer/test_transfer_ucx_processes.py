"""Real UCX between two processes: a spawned prefill-like sender and a receiver in this process."""

import multiprocessing
import socket
import time

import pytest
import torch

import kv_sender_process
from common.transfer import (
    KVHandle,
    KVLayout,
    KVLayoutMismatch,
    KVTransferError,
    KVTransferNotFound,
    create_receiver,
    new_transfer_id,
)

LAYOUT = KVLayout("tiny-llama", "float16", 16, 4, 2, 32)


class SenderProcess:
    def __init__(self, layout: KVLayout, port: int = 0):
        context = multiprocessing.get_context("spawn")
        self.commands, self.events = context.Queue(), context.Queue()
        self.process = context.Process(
            target=kv_sender_process.main, args=(layout, self.commands, self.events, port), daemon=True
        )
        self.process.start()
        self._early: list[tuple] = []  # events that arrived while waiting for another kind
        self.address = self.expect("address")[1]

    def expect(self, kind: str, timeout: float = 60):
        """The oldest event of `kind` (releases race with handles of later offers)."""
        for index, event in enumerate(self._early):
            if event[0] == kind:
                return self._early.pop(index)
        while True:
            event = self.events.get(timeout=timeout)
            if event[0] == kind:
                return event
            self._early.append(event)

    def offer(self, block_ids, num_tokens, lease_seconds=30.0) -> KVHandle:
        self.commands.put(("offer", new_transfer_id(), block_ids, num_tokens, lease_seconds))
        return KVHandle(*self.expect("handle")[1:])

    def stop(self):
        if self.process.is_alive():
            self.commands.put(("close",))
            self.process.join(timeout=30)
        if self.process.is_alive():
            self.process.kill()


@pytest.fixture(scope="module")
def sender():
    sender = SenderProcess(LAYOUT)
    yield sender
    sender.stop()


@pytest.fixture(scope="module")
def receiver():
    receiver = create_receiver("ucx", LAYOUT, timeout_seconds=30)
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def pool():
    return kv_sender_process.make_pool(LAYOUT)  # the same seeded contents as the sender's pool


def _destination(layout: KVLayout, num_blocks: int) -> torch.Tensor:
    return torch.full(layout.block_shape(num_blocks), float("nan"), dtype=layout.torch_dtype)


def test_scattered_blocks_arrive_byte_exact_across_processes(sender, receiver, pool):
    block_ids = [50, 3, 27, 8, 61, 14]
    handle = sender.offer(block_ids, 90)
    destination = _destination(LAYOUT, len(block_ids))
    stats = receiver.begin(handle, destination).wait(30)

    # layers x 2 x blocks x block_size x kv_heads x head_dim x bytes per float16
    assert stats.num_bytes == 4 * 2 * 6 * 16 * 2 * 32 * 2
    assert torch.equal(destination, pool[:, :, block_ids])
    assert stats.transport != "unknown" and stats.gbps > 0
    _, transfer_id, outcome, num_bytes, _ = sender.expect("released")
    assert (transfer_id, outcome, num_bytes) == (handle.transfer_id, "DONE", stats.num_bytes)


def test_sixteen_concurrent_pulls_over_one_cached_endpoint(sender, receiver, pool):
    generator = torch.Generator().manual_seed(7)
    jobs = []
    for index in range(16):
        block_ids = torch.randperm(kv_sender_process.NUM_POOL_BLOCKS, generator=generator)[: 1 + index % 5].tolist()
        handle = sender.offer(block_ids, len(block_ids) * 16)
        destination = _destination(LAYOUT, len(block_ids))
        jobs.append((handle, block_ids, destination, receiver.begin(handle, destination)))
    for handle, block_ids, destination, ticket in jobs:
        assert ticket.wait(30).num_bytes == len(block_ids) * LAYOUT.bytes_per_block
        assert torch.equal(destination, pool[:, :, block_ids])
    released = {sender.expect("released")[1:3] for _ in jobs}
    assert released == {(handle.transfer_id, "DONE") for handle, *_ in jobs}
    assert list(receiver._endpoints) == [sender.address]


def test_layout_mismatch_across_processes_names_block_size_and_leaves_the_offer(sender):
    decode_layout = KVLayout("tiny-llama", "float16", 32, 4, 2, 32)
    receiver = create_receiver("ucx", decode_layout, timeout_seconds=30)
    try:
        handle = sender.offer([1, 2], 20, lease_seconds=3.0)
        with pytest.raises(KVLayoutMismatch, match="block_size: prefill=16 decode=32"):
            receiver.begin(handle, _destination(decode_layout, 2)).wait(30)
    finally:
        receiver.close()
    # the refused pull left the offer to its lease
    assert sender.expect("released")[1:3] == (handle.transfer_id, "EXPIRED")


def test_lease_expiry_across_processes(sender, receiver):
    handle = sender.offer([4, 5], 20, lease_seconds=0.3)
    assert sender.expect("released")[1:3] == (handle.transfer_id, "EXPIRED")
    with pytest.raises(KVTransferNotFound):
        receiver.begin(handle, _destination(LAYOUT, 2)).wait(30)


def test_a_dead_sender_fails_pulls_instead_of_hanging(pool):
    sender = SenderProcess(LAYOUT)
    receiver = create_receiver("ucx", LAYOUT, timeout_seconds=10, connect_timeout_seconds=2)
    try:
        first = sender.offer([1], 16)
        receiver.begin(first, _destination(LAYOUT, 1)).wait(30)  # the endpoint is now cached
        assert sender.expect("released")[1:3] == (first.transfer_id, "DONE")
        orphan = sender.offer([2], 16)
        sender.process.kill()
        sender.process.join(timeout=30)
        ticket = receiver.begin(orphan, _destination(LAYOUT, 1))
        with pytest.raises(KVTransferError):
            ticket.wait(30)
    finally:
        receiver.close()
        sender.stop()



def test_a_restarted_sender_gets_its_port_back_while_the_old_connections_are_in_time_wait():
    """A restarted prefill worker listens on its old KV port (the address decode workers trust) at once,
    not a minute later when the connections its predecessor closed leave TIME_WAIT."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            accepted.close()  # the listening side closes first: the port sits in TIME_WAIT
            time.sleep(0.2)
    sender = SenderProcess(LAYOUT, port=port)
    try:
        assert sender.address == f"127.0.0.1:{port}"
    finally:
        sender.stop()
