"""OfferBook: leases, ack deadlines and exactly-once release, without any transport."""

import threading
import time

import pytest

from common.transfer import (
    KVInvalidPull,
    KVLayout,
    KVLayoutMismatch,
    KVSizeMismatch,
    KVTransferNotFound,
    TransferOutcome,
    new_transfer_id,
)
from common.transfer.offers import OfferBook

LAYOUT = KVLayout("m", "float16", 4, 2, 2, 8)


@pytest.fixture
def book(releases):
    book = OfferBook(LAYOUT, lambda *args: releases.put(args), ack_timeout_seconds=0.3)
    yield book
    book.close()


def _claim(book, transfer_id, layout=LAYOUT, num_blocks=2):
    return book.claim(transfer_id, layout, num_blocks, num_blocks * layout.bytes_per_block)


def test_unpulled_offer_expires_after_its_lease(book, releases):
    transfer_id = new_transfer_id()
    start = time.monotonic()
    book.add(transfer_id, [3, 9], 5, 0.2, None)
    released_id, outcome, stats = releases.get(timeout=5)
    assert (released_id, outcome) == (transfer_id, TransferOutcome.EXPIRED)
    assert 0.15 < time.monotonic() - start < 3
    assert stats.num_bytes == 0 and stats.num_blocks == 2
    with pytest.raises(KVTransferNotFound):
        _claim(book, transfer_id)


def test_claimed_offer_is_not_expired_by_its_lease_but_by_the_missing_ack(book, releases):
    transfer_id = new_transfer_id()
    book.add(transfer_id, [3, 9], 5, 0.05, None)
    _claim(book, transfer_id)
    with pytest.raises(KVTransferNotFound, match="already pulled"):
        _claim(book, transfer_id)  # a second pull of the same transfer
    released_id, outcome, _ = releases.get(timeout=5)
    assert (released_id, outcome) == (transfer_id, TransferOutcome.FAILED)


def test_finish_releases_done_exactly_once(book, releases):
    transfer_id = new_transfer_id()
    book.add(transfer_id, [1, 2], 8, 10, {"traceparent": "t"})
    _claim(book, transfer_id)
    assert book.finish(transfer_id, True)
    assert not book.finish(transfer_id, True)
    assert not book.release(transfer_id, TransferOutcome.CANCELLED)
    released_id, outcome, stats = releases.get(timeout=5)
    assert outcome is TransferOutcome.DONE and stats.trace_context == {"traceparent": "t"}
    time.sleep(0.4)  # past the ack deadline: nothing more arrives
    assert releases.empty() and book.num_pending == 0


@pytest.mark.parametrize(
    "layout, num_blocks, num_bytes, error, match",
    [
        (KVLayout("m", "float16", 8, 2, 2, 8), 2, None, KVLayoutMismatch, "block_size: prefill=4 decode=8"),
        (KVLayout("other", "float16", 4, 2, 2, 8), 2, None, KVLayoutMismatch, "model_name: prefill=m decode=other"),
        (LAYOUT, 3, None, KVSizeMismatch, "num_blocks: prefill=2 decode=3"),
        (LAYOUT, 2, 7, KVInvalidPull, "expected_bytes"),
    ],
)
def test_refused_pull_leaves_the_offer_to_a_valid_pull(book, releases, layout, num_blocks, num_bytes, error, match):
    transfer_id = new_transfer_id()
    book.add(transfer_id, [1, 2], 8, 10, None)
    num_bytes = num_blocks * layout.bytes_per_block if num_bytes is None else num_bytes
    with pytest.raises(error, match=match):
        book.claim(transfer_id, layout, num_blocks, num_bytes)
    time.sleep(0.1)
    assert releases.empty() and book.num_pending == 1  # anyone may reach the listener: no one-pull denial
    assert _claim(book, transfer_id).block_ids == [1, 2]
    assert book.finish(transfer_id, True)
    assert releases.get(timeout=5)[:2] == (transfer_id, TransferOutcome.DONE)


def test_refused_pull_leaves_the_offer_to_its_lease(book, releases):
    transfer_id = new_transfer_id()
    book.add(transfer_id, [1, 2], 8, 0.3, None)
    with pytest.raises(KVSizeMismatch):
        _claim(book, transfer_id, num_blocks=3)
    assert releases.get(timeout=5)[:2] == (transfer_id, TransferOutcome.EXPIRED)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(transfer_id="x"), "transfer_id"),
        (dict(block_ids=[]), "block_ids"),
        (dict(num_tokens=9), "num_tokens"),  # 2 blocks of 4 hold at most 8
        (dict(lease_seconds=0), "lease_seconds"),
    ],
)
def test_bad_offer_raises_value_error_naming_the_field(book, kwargs, field):
    values = dict(transfer_id=new_transfer_id(), block_ids=[0, 1], num_tokens=8, lease_seconds=1, trace_context=None)
    values.update(kwargs)
    with pytest.raises(ValueError, match=field):
        book.add(**values)


def test_duplicate_offer_is_refused(book):
    transfer_id = new_transfer_id()
    book.add(transfer_id, [0], 1, 10, None)
    with pytest.raises(ValueError, match="already offered"):
        book.add(transfer_id, [1], 1, 10, None)


def test_close_cancels_everything_pending_before_returning(releases):
    book = OfferBook(LAYOUT, lambda *args: releases.put(args))
    offered, pulled = new_transfer_id(), new_transfer_id()
    book.add(offered, [0], 1, 60, None)
    book.add(pulled, [1, 2], 5, 60, None)
    _claim(book, pulled)
    book.close()
    outcomes = {releases.get_nowait()[:2] for _ in range(2)}  # already delivered: no waiting
    assert outcomes == {(offered, TransferOutcome.CANCELLED), (pulled, TransferOutcome.CANCELLED)}


def test_a_raising_callback_does_not_stop_other_releases():
    seen = []
    threads = set()

    def on_release(transfer_id, outcome, stats):
        threads.add(threading.current_thread().name)
        seen.append(transfer_id)
        raise RuntimeError("callback bug")

    book = OfferBook(LAYOUT, on_release)
    ids = [new_transfer_id() for _ in range(3)]
    for transfer_id in ids:
        book.add(transfer_id, [0], 1, 60, None)
        book.release(transfer_id, TransferOutcome.CANCELLED)
    book.close()
    assert seen == ids
    assert threads == {"kv-offer-book"}  # never the caller's thread
