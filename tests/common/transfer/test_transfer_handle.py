"""KVHandle and TransferTicket: validation, ids, the ticket's one state change."""

import threading

import pytest
import torch

from common.kv.layout import KVLayout
from common.transfer.base import TransferState, TransferTicket
from common.transfer.errors import KVTransferNotFound, KVTransferTimeout
from common.transfer.handle import KVHandle, TransferStats, new_transfer_id

LAYOUT = KVLayout("org/Model;v=2 ü", "bfloat16", 16, 30, 3, 64)


def test_transfer_ids_are_random_128_bit_hex():
    ids = {new_transfer_id() for _ in range(100)}
    assert len(ids) == 100 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(transfer_id="xyz"), "transfer_id"),
        (dict(transfer_id="A" * 32), "transfer_id"),
        (dict(address=""), "address"),
        (dict(num_blocks=0), "num_blocks"),
        (dict(num_tokens=0), "num_tokens"),
        (dict(layout="model_name=m;dtype=float16"), "layout"),
        (dict(block_hashes=(b"x" * 16,)), "block_hashes"),
    ],
)
def test_bad_handle_raises_value_error_naming_the_field(kwargs, field):
    values = dict(transfer_id=new_transfer_id(), address="h:1", num_tokens=5, num_blocks=1,
                  layout=LAYOUT)
    values.update(kwargs)
    with pytest.raises(ValueError, match=field):
        KVHandle(**values)


def test_handle_holds_its_layout_and_checks_hashes_against_its_block_size():
    handle = KVHandle(new_transfer_id(), "h:1", 40, 3, LAYOUT, (b"a" * 16, b"b" * 16))
    assert handle.layout is LAYOUT  # held as the dataclass, never re-parsed
    with pytest.raises(ValueError, match="block_hashes: 1 hashes, the 40 tokens fill 2 blocks of 16"):
        KVHandle(new_transfer_id(), "h:1", 40, 3, LAYOUT, (b"a" * 16,))


def _ticket() -> TransferTicket:
    handle = KVHandle(new_transfer_id(), "h:1", 5, 1, LAYOUT)
    return TransferTicket(handle, torch.empty(0))


def test_ticket_finishes_once_and_wait_returns_stats_or_raises():
    ticket = _ticket()
    assert ticket.state is TransferState.PENDING
    with pytest.raises(KVTransferTimeout):
        ticket.wait(0.01)
    stats = TransferStats(num_bytes=1000, num_blocks=1, seconds=1e-6, transport="tcp")
    threading.Timer(0.05, ticket.set_done, args=(stats,)).start()
    assert ticket.wait(5) is stats and ticket.state is TransferState.DONE
    assert stats.gbps == pytest.approx(8.0)
    assert not ticket.set_failed(KVTransferNotFound("late"))  # state never changes twice
    assert ticket.state is TransferState.DONE

    failed = _ticket()
    failed.set_failed(KVTransferNotFound("gone"))
    assert failed.state is TransferState.FAILED
    with pytest.raises(KVTransferNotFound, match="gone"):
        failed.wait(0)
