"""The sender's ledger of offered KV: leases, pull validation, and exactly-once release.

Both backends keep their offers here (through `BookedSender`), so leases, layout checks and acks
behave identically.

    offered ──claim (valid pull)──► pulling ──finish(ok)────────► released DONE
       │  └─claim (bad layout/size/block range): refused, it stays offered
       ├──lease passes──────────────────────────────────────────► released EXPIRED
       │                    pulling ──ack_timeout passes / send error ► released FAILED
       └──cancel / close (from either state)────────────────────► released CANCELLED

A pull names the blocks it wants, [first_block_index, len(block_ids)): a receiver that holds the first
blocks already (its prefix cache) takes only the rest, and the ack releases the whole offer.

A refused pull leaves the offer untouched, to its lease or a valid pull: the listener accepts any
peer that can reach it, so a pull that names a live transfer id with a wrong layout or size must not
be able to free another request's blocks. The legitimate puller checks the layout before it pulls, and
the frontend's Abort cancels the offer of a hand-off that failed, so refused offers rarely wait out
their lease.

One daemon thread enforces the deadlines and calls `on_release`, so the callback never runs on a
caller's thread, never under a lock, and never on the UCX event loop.
"""

from __future__ import annotations

import heapq
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable


from common.kv.layout import KVLayout
from common.transfer import protocol
from common.transfer.base import Gathered, KVSender, OnRelease, TransferOutcome
from common.transfer.errors import (
    KVInvalidPull,
    KVLayoutMismatch,
    KVSizeMismatch,
    KVTransferError,
    KVTransferNotFound,
)
from common.transfer.handle import (
    TRANSFER_TIMEOUT_SECONDS,
    KVHandle,
    TransferStats,
    check_block_hashes,
    check_transfer_id,
)

logger = logging.getLogger(__name__)


@dataclass
class Offer:
    transfer_id: str
    block_ids: list[int]
    num_tokens: int
    deadline: float  # time.monotonic() when the lease (or, once pulling, the ack wait) ends
    trace_context: dict[str, str] = field(default_factory=dict)
    is_pulling: bool = False


class OfferBook:
    """Thread-safe offers of one sender; every offer is released exactly once."""

    def __init__(self, layout: KVLayout, on_release: OnRelease,
                 ack_timeout_seconds: float = TRANSFER_TIMEOUT_SECONDS) -> None:
        if ack_timeout_seconds <= 0:
            raise ValueError(f"ack_timeout_seconds: must be positive, got {ack_timeout_seconds}")
        self.layout = layout
        self._on_release = on_release
        self._ack_timeout_seconds = ack_timeout_seconds
        self._offers: dict[str, Offer] = {}
        self._deadlines: list[tuple[float, str]] = []  # heap; stale entries skipped lazily
        self._releases: queue.SimpleQueue = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._is_closed = False
        self._thread = threading.Thread(target=self._run, name="kv-offer-book", daemon=True)
        self._thread.start()

    @property
    def num_pending(self) -> int:
        with self._cond:
            return len(self._offers)

    def add(
        self,
        transfer_id: str,
        block_ids: list[int],
        num_tokens: int,
        lease_seconds: float,
        trace_context: dict[str, str] | None,
    ) -> Offer:
        check_transfer_id(transfer_id)
        if not block_ids:
            raise ValueError("block_ids: must not be empty")
        if not 0 < num_tokens <= len(block_ids) * self.layout.block_size:
            raise ValueError(
                f"num_tokens: {num_tokens} does not fit {len(block_ids)} blocks of {self.layout.block_size}"
            )
        if not lease_seconds > 0:
            raise ValueError(f"lease_seconds: must be positive, got {lease_seconds}")
        deadline = time.monotonic() + lease_seconds
        offer = Offer(transfer_id, list(block_ids), num_tokens, deadline, dict(trace_context or {}))
        with self._cond:
            if self._is_closed:
                raise KVTransferError("sender is closed")
            if transfer_id in self._offers:
                raise ValueError(f"transfer_id: {transfer_id} is already offered")
            self._offers[transfer_id] = offer
            self._push_deadline(offer)
        return offer

    def claim(self, transfer_id: str, layout: KVLayout, expected_num_blocks: int, expected_bytes: int,
              first_block_index: int = 0) -> Offer:
        """Starts a pull of blocks [first_block_index, first_block_index + expected_num_blocks), which must
        end at the offer's last block; raises a typed error for a pull it refuses, leaving the offer as it was."""
        with self._cond:
            offer = self._offers.get(transfer_id)
            if offer is None or offer.is_pulling:
                raise KVTransferNotFound(
                    f"transfer {transfer_id} is not offered here (unknown, expired, cancelled or already pulled)"
                )
            error = self._check_pull(offer, layout, expected_num_blocks, expected_bytes, first_block_index)
            if error is not None:
                raise error
            offer.is_pulling = True
            offer.deadline = time.monotonic() + self._ack_timeout_seconds
            self._push_deadline(offer)
            return offer

    def _check_pull(
        self, offer: Offer, layout: KVLayout, expected_num_blocks: int, expected_bytes: int, first_block_index: int
    ) -> KVTransferError | None:
        mismatch = self.layout.describe_mismatch(layout, "prefill", "decode")
        if mismatch:
            return KVLayoutMismatch(f"KV layout mismatch: {mismatch}")
        if first_block_index < 0 or expected_num_blocks < 1:
            return KVInvalidPull(f"block range: first_block_index={first_block_index} "
                                 f"expected_num_blocks={expected_num_blocks}")
        if first_block_index + expected_num_blocks != len(offer.block_ids):
            return KVSizeMismatch(f"num_blocks: prefill={len(offer.block_ids)} decode={expected_num_blocks} "
                                  f"from block {first_block_index}")
        if expected_bytes != self.layout.bytes_per_block * expected_num_blocks:
            return KVInvalidPull(
                f"expected_bytes: {expected_bytes} != {self.layout.bytes_per_block} bytes/block"
                f" x {expected_num_blocks} blocks"
            )
        return None

    def finish(self, transfer_id: str, is_ok: bool, stats: TransferStats | None = None) -> bool:
        """Ends a pull (ack received: DONE; send or receiver failed: FAILED)."""
        outcome = TransferOutcome.DONE if is_ok else TransferOutcome.FAILED
        return self.release(transfer_id, outcome, stats)

    def release(self, transfer_id: str, outcome: TransferOutcome, stats: TransferStats | None = None) -> bool:
        """Queues the one on_release of this offer; False if it was already released."""
        with self._cond:
            offer = self._offers.pop(transfer_id, None)
            if offer is None:
                return False
            if stats is None:
                stats = TransferStats(0, len(offer.block_ids), 0.0, "none", offer.trace_context)
            self._releases.put((transfer_id, outcome, stats))
            self._cond.notify()
        return True

    def close(self) -> None:
        """Releases every pending offer CANCELLED and waits until all callbacks have run."""
        with self._cond:
            if self._is_closed:
                return
            pending = list(self._offers)
        for transfer_id in pending:
            self.release(transfer_id, TransferOutcome.CANCELLED)
        with self._cond:
            self._is_closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _push_deadline(self, offer: Offer) -> None:
        heapq.heappush(self._deadlines, (offer.deadline, offer.transfer_id))
        self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                expired = self._pop_expired(time.monotonic())
                if not expired and self._releases.empty():
                    if self._is_closed:
                        return
                    timeout = self._deadlines[0][0] - time.monotonic() if self._deadlines else None
                    self._cond.wait(timeout)
                    continue
            for transfer_id, outcome in expired:
                self.release(transfer_id, outcome)
            self._deliver_releases()

    def _pop_expired(self, now: float) -> list[tuple[str, TransferOutcome]]:
        expired = []
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, transfer_id = heapq.heappop(self._deadlines)
            offer = self._offers.get(transfer_id)
            if offer is not None and offer.deadline == deadline:
                # A pull that never got its ack failed; an offer nobody pulled expired.
                expired.append((transfer_id, TransferOutcome.FAILED if offer.is_pulling else TransferOutcome.EXPIRED))
        return expired

    def _deliver_releases(self) -> None:
        while True:
            try:
                transfer_id, outcome, stats = self._releases.get_nowait()
            except queue.Empty:
                return
            try:
                self._on_release(transfer_id, outcome, stats)
            except Exception:  # a faulty callback must not stop other releases
                logger.exception("on_release(%s, %s) raised", transfer_id, outcome.name)


class BookedSender(KVSender):
    """The KVSender methods both backends share: offers live in an OfferBook; subclasses serve pulls.

    A subclass sets `_address` once it can be reached and releases everything with `_book.close()`.
    """

    _address: str  # "host:port" that receivers dial

    def __init__(
        self,
        layout: KVLayout,
        gather_blocks: Callable[[list[int]], Gathered],
        on_release: OnRelease,
        ack_timeout_seconds: float,
    ) -> None:
        self.layout = layout
        self._gather_blocks = gather_blocks
        self._book = OfferBook(layout, on_release, ack_timeout_seconds)

    @property
    def address(self) -> str:
        return self._address

    @property
    def num_pending(self) -> int:
        return self._book.num_pending

    def offer(
        self,
        transfer_id: str,
        block_ids: list[int],
        num_tokens: int,
        lease_seconds: float,
        trace_context: dict[str, str] | None = None,
        block_hashes: tuple[bytes, ...] = (),
    ) -> KVHandle:
        block_hashes = tuple(block_hashes)
        if block_hashes:  # checked before anything is held
            check_block_hashes(block_hashes, num_tokens, self.layout.block_size)
        offer = self._book.add(transfer_id, block_ids, num_tokens, lease_seconds, trace_context)
        return KVHandle(transfer_id, self._address, num_tokens, len(offer.block_ids), self.layout,
                        block_hashes)

    def _claim(self, pull: protocol.Pull) -> tuple[Offer, list[int]]:
        """Claims the offer a pull names; returns it and the block ids the pull takes."""
        offer = self._book.claim(pull.transfer_id, pull.layout, pull.expected_num_blocks, pull.expected_bytes,
                                 pull.first_block_index)
        return offer, offer.block_ids[pull.first_block_index:]

    def cancel(self, transfer_id: str) -> bool:
        return self._book.release(transfer_id, TransferOutcome.CANCELLED)
