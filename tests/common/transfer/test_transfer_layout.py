"""KVLayout, KVHandle and TransferTicket: validation, signatures, mismatch descriptions."""

import threading

import pytest
import torch

from common.transfer.base import (
    KVHandle,
    KVLayout,
    KVTransferNotFound,
    KVTransferTimeout,
    TransferState,
    TransferStats,
    TransferTicket,
    new_transfer_id,
)

LAYOUT = KVLayout("org/Model;v=2 ü", "bfloat16", 16, 30, 3, 64)


def test_bytes_per_block_counts_layers_k_v_heads_and_dtype():
    # 2 (K, V) x 30 layers x 16 tokens x 3 heads x 64 channels x 2 bytes (bf16)
    assert LAYOUT.bytes_per_block == 2 * 30 * 16 * 3 * 64 * 2
    assert KVLayout("m", "float32", 8, 2, 1, 4).bytes_per_block == 2 * 2 * 8 * 1 * 4 * 4


def test_signature_round_trips_even_with_separators_in_the_model_name():
    signature = LAYOUT.signature()
    assert KVLayout.from_signature(signature) == LAYOUT
    assert signature == KVLayout(**vars(LAYOUT)).signature()  # stable across instances
    assert "block_size=16" in signature


@pytest.mark.parametrize(
    "signature",
    [
        "",
        "model_name=m;dtype=float16",
        "model_name=m;dtype=float16;block_size=x;num_layers=1;num_kv_heads=1;head_dim=1",
    ],
)
def test_malformed_signature_raises_value_error(signature):
    with pytest.raises(ValueError, match="layout signature|block_size"):
        KVLayout.from_signature(signature)


def test_describe_mismatch_names_every_differing_field():
    other = KVLayout(LAYOUT.model_name, "float16", 32, 30, 3, 128)
    text = LAYOUT.describe_mismatch(other, "prefill", "decode")
    assert "block_size: prefill=16 decode=32" in text
    assert "head_dim: prefill=64 decode=128" in text
    assert "dtype: prefill=bfloat16 decode=float16" in text
    assert "num_layers" not in text
    assert LAYOUT.describe_mismatch(KVLayout(**vars(LAYOUT))) == ""


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(model_name=""), "model_name"),
        (dict(dtype="float17"), "dtype"),
        (dict(block_size=0), "block_size"),
        (dict(num_layers=-1), "num_layers"),
        (dict(num_kv_heads=2.0), "num_kv_heads"),
        (dict(head_dim=True), "head_dim"),
    ],
)
def test_bad_layout_field_raises_value_error_naming_it(kwargs, field):
    values = dict(vars(LAYOUT), **kwargs)
    with pytest.raises(ValueError, match=field):
        KVLayout(**values)


def test_dtype_accepts_torch_prefix_and_maps_to_torch():
    layout = KVLayout("m", "torch.float16", 16, 1, 1, 8)
    assert layout.dtype == "float16" and layout.torch_dtype is torch.float16


def test_from_pool_reads_a_pool_layout_with_torch_dtype():
    class PoolLayout:
        num_layers, block_size, num_kv_heads, head_dim, dtype = 4, 8, 2, 16, torch.float16

    layout = KVLayout.from_pool(PoolLayout(), "m")
    assert layout == KVLayout("m", "float16", 8, 4, 2, 16)


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
    ],
)
def test_bad_handle_raises_value_error_naming_the_field(kwargs, field):
    values = dict(transfer_id=new_transfer_id(), address="h:1", num_tokens=5, num_blocks=1,
                  layout_signature=LAYOUT.signature())
    values.update(kwargs)
    with pytest.raises(ValueError, match=field):
        KVHandle(**values)


def _ticket() -> TransferTicket:
    handle = KVHandle(new_transfer_id(), "h:1", 5, 1, LAYOUT.signature())
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
