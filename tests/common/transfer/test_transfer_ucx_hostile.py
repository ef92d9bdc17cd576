"""A UCX sender survives peers that speak garbage, and keeps serving well-behaved receivers."""


import numpy as np
import pytest
import torch

from common.transfer import KVLayout, KVTransferNotFound, TransferOutcome, create_receiver, create_sender, new_transfer_id
from common.transfer import protocol
from common.transfer.ucx_runtime import UcxRuntime, parse_transport

LAYOUT = KVLayout("m", "float16", 8, 2, 2, 16)


@pytest.fixture
def pool():
    return torch.randn(LAYOUT.block_shape(10)).half()


@pytest.fixture
def sender(pool, releases):
    sender = create_sender("ucx", LAYOUT, lambda ids: pool[:, :, ids].contiguous(), lambda *a: releases.put(a))
    yield sender
    sender.close()


def _send_raw(address: str, payloads: list[bytes]) -> None:
    runtime = UcxRuntime.get()
    host, port = address.rsplit(":", 1)

    async def talk():
        endpoint = await runtime.ucxx.create_endpoint(host, int(port))
        for payload in payloads:
            await endpoint.send(np.frombuffer(payload, dtype=np.uint8))
        return endpoint

    return runtime.run(talk(), timeout=30)


@pytest.mark.parametrize(
    "payload",
    [
        bytes(protocol.FRAME_BYTES),  # right size, no magic
        b"\xff" * (protocol.FRAME_BYTES * 4),  # larger than any control frame
        bytes(protocol.encode_frame(protocol.response_ok(1 << 40))),  # a valid frame of the wrong kind
    ],
)
def test_garbage_from_one_peer_does_not_disturb_other_pulls(sender, pool, releases, payload):
    handle = sender.offer(new_transfer_id(), [2, 7], 10, 30)
    endpoint = _send_raw(sender.address, [payload])
    receiver = create_receiver("ucx", LAYOUT, timeout_seconds=20)
    try:
        destination = torch.empty(LAYOUT.block_shape(2), dtype=torch.float16)
        receiver.begin(handle, destination).wait(20)
        assert torch.equal(destination, pool[:, :, [2, 7]])
        assert releases.get(timeout=10)[:2] == (handle.transfer_id, TransferOutcome.DONE)
    finally:
        receiver.close()
        UcxRuntime.get().loop.call_soon_threadsafe(endpoint.abort)


def test_a_pull_for_someone_elses_transfer_cannot_ack_it(sender, releases):
    """An ack only counts from the endpoint that pulled; a stray ack changes nothing."""
    handle = sender.offer(new_transfer_id(), [1], 8, 30)
    endpoint = _send_raw(sender.address, [bytes(protocol.encode_frame(protocol.ack_message(handle.transfer_id, True)))])
    receiver = create_receiver("ucx", LAYOUT, timeout_seconds=20)
    try:
        assert sender.num_pending == 1 and releases.empty()
        receiver.begin(handle, torch.empty(LAYOUT.block_shape(1), dtype=torch.float16)).wait(20)
        assert releases.get(timeout=10)[1] is TransferOutcome.DONE
        with pytest.raises(KVTransferNotFound):
            receiver.begin(handle, torch.empty(LAYOUT.block_shape(1), dtype=torch.float16)).wait(20)
    finally:
        receiver.close()
        UcxRuntime.get().loop.call_soon_threadsafe(endpoint.abort)


UCX_ENDPOINT_INFO = """\
#                 lane[0]: cm tcp
#                 lane[1]:  8:cuda_ipc/cuda md[5]          -> md[5]/cuda_ipc/sysdev[255] rma_bw#0
#                 lane[2]:  2:tcp/lo.0 md[1]                -> md[1]/tcp/sysdev[255] seg 4294967295 am wireup
#
# +--------------------------+-----------------------------------------------------+
# | ucp_context_0 self cfg#4 | tagged message by ucp_tag_send* from host memory    |
# +--------------------------+--------------------------------------------+--------+
# |                        0 | eager short                                | tcp/lo |
# |               16353..inf | (?) rendezvous fragmented copy-in copy-out | posix/memory, cma/memory |
# +--------------------------+--------------------------------------------+--------+
#
"""


def test_transport_is_read_from_the_tag_table_or_the_bulk_lanes():
    assert parse_transport(UCX_ENDPOINT_INFO, "host") == "posix+cma"
    assert parse_transport(UCX_ENDPOINT_INFO, "cuda") == "cuda_ipc"  # no cuda table yet: the rma_bw lane
    assert parse_transport("nothing useful", "host") == "unknown"
