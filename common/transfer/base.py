"""The KV transfer interface: what prefill offers and what decode pulls (`handle.py` holds the data
that names a transfer, `errors.py` how one fails).

Both backends (`ucx.py` for real workers, `fake.py` for in-process tests) implement `KVSender` and
`KVReceiver` with identical semantics:

    prefill: sender.offer(id, block_ids, ...) -> KVHandle   (blocks held under a lease)
    decode:  ticket = receiver.begin(handle, destination, first_block_index=k)   (non-blocking)
             receiver.poll(ticket) -> PENDING | DONE | FAILED
    prefill: on_release(id, DONE | EXPIRED | FAILED | CANCELLED, stats)   (free the blocks here)

A transfer moves one request's blocks as one contiguous tensor
`[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]` (2 = K, V). A receiver that already
holds the first k blocks (its prefix cache has them) pulls only the rest:

    offer:  [ b0 | b1 | b2 | b3 | b4 ]        handle.num_blocks = 5
    pull:             [ b2 | b3 | b4 ]        first_block_index = 2: destination [L, 2, 3, BS, Hkv, D]
"""

from __future__ import annotations

import abc
import enum
import threading
from typing import TYPE_CHECKING, Callable, Union

import torch

from common.kv.layout import KVLayout
from common.transfer.errors import KVTransferError, KVTransferTimeout
from common.transfer.handle import (
    CONNECT_TIMEOUT_SECONDS,
    TRANSFER_TIMEOUT_SECONDS,
    KVHandle,
    TransferStats,
    split_address,
)

if TYPE_CHECKING:
    from common.kv.kv_pool import TransferBuffer



class TransferState(enum.Enum):
    """What `KVReceiver.poll` reports for a ticket."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class TransferOutcome(enum.Enum):
    """Why the prefill side released an offer (its blocks can be freed in every case)."""

    DONE = "done"  # the receiver acked the data
    EXPIRED = "expired"  # nobody pulled before the lease ran out
    FAILED = "failed"  # a pull was refused (layout/size mismatch), the send failed or no ack came
    CANCELLED = "cancelled"  # cancel() or close() on the sender


# Called once per offer by the sender, off the caller's thread; must not block (enqueue the free).
OnRelease = Callable[[str, TransferOutcome, TransferStats], None]


class TransferTicket:
    """One receive in flight; its state changes once, from PENDING to DONE or FAILED."""

    def __init__(self, handle: KVHandle, destination: torch.Tensor, first_block_index: int = 0) -> None:
        self.handle = handle
        self.destination = destination  # [L, 2, n, BS, Hkv, D], written in place
        self.first_block_index = first_block_index  # blocks [first_block_index, handle.num_blocks) are pulled
        self.error: KVTransferError | None = None
        self.stats: TransferStats | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()

    @property
    def transfer_id(self) -> str:
        return self.handle.transfer_id

    @property
    def state(self) -> TransferState:
        if not self._done.is_set():
            return TransferState.PENDING
        return TransferState.FAILED if self.error is not None else TransferState.DONE

    def set_done(self, stats: TransferStats) -> bool:
        """Backends call this once; returns False if the ticket had already finished."""
        with self._lock:
            if self._done.is_set():
                return False
            self.stats = stats
            self._done.set()
            return True

    def set_failed(self, error: KVTransferError) -> bool:
        with self._lock:
            if self._done.is_set():
                return False
            self.error = error
            self._done.set()
            return True

    def wait(self, timeout: float | None = None) -> TransferStats:
        """Blocks until finished; returns the stats or raises the ticket's typed error.

        Raises KVTransferTimeout if still pending after `timeout`; the transfer itself goes on
        until its own deadline, so keep the destination untouched until poll() leaves PENDING.
        """
        if not self._done.wait(timeout):
            raise KVTransferTimeout(f"transfer {self.transfer_id} still pending after {timeout}s")
        if self.error is not None:
            raise self.error
        assert self.stats is not None  # set together with _done
        return self.stats

def check_first_block_index(handle: KVHandle, first_block_index: int) -> None:
    """A pull takes at least the offer's last block: 0 <= first_block_index < handle.num_blocks."""
    if isinstance(first_block_index, bool) or not isinstance(first_block_index, int) \
            or not 0 <= first_block_index < handle.num_blocks:
        raise ValueError(f"first_block_index: must be in [0, {handle.num_blocks - 1}], got {first_block_index!r}")


def check_destination(layout: KVLayout, handle: KVHandle, destination: torch.Tensor, first_block_index: int = 0) -> None:
    """The receiver writes raw bytes into `destination`, so its shape, dtype and layout must be exact:
    [L, 2, handle.num_blocks - first_block_index, BS, Hkv, D]."""
    split_address(handle.address)
    check_first_block_index(handle, first_block_index)
    expected = layout.block_shape(handle.num_blocks - first_block_index)
    if tuple(destination.shape) != expected:
        raise ValueError(f"destination: shape {tuple(destination.shape)} != expected {expected}")
    if destination.dtype != layout.torch_dtype:
        raise ValueError(f"destination: dtype {destination.dtype} != layout dtype {layout.torch_dtype}")
    if not destination.is_contiguous():
        raise ValueError("destination: must be contiguous")


# What a sender's gather callable returns: the gathered tensor, complete, or a buffer still being filled
# (a KVPool.start_gather TransferBuffer: `tensor`, and `is_ready()` once it may be read).
Gathered = Union[torch.Tensor, "TransferBuffer"]


def gathered_tensor(gathered: Gathered) -> torch.Tensor:
    """The tensor of a gather result, waiting for it to be complete."""
    if isinstance(gathered, torch.Tensor):
        return gathered
    if gathered.ready is not None:
        gathered.ready.synchronize()
    return gathered.tensor


def check_gathered(layout: KVLayout, num_blocks: int, gathered: torch.Tensor) -> None:
    """A sender refuses to ship a gather result that does not match its own layout."""
    expected = layout.block_shape(num_blocks)
    if tuple(gathered.shape) != expected or gathered.dtype != layout.torch_dtype:
        raise KVTransferError(
            f"gather_blocks returned {tuple(gathered.shape)} {gathered.dtype}, expected {expected} {layout.torch_dtype}"
        )
    if not gathered.is_contiguous():
        raise KVTransferError("gather_blocks returned a non-contiguous tensor")


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (same memory), for sending or receiving raw bytes."""
    return tensor.reshape(-1).view(torch.uint8)


class KVSender(abc.ABC):
    """Prefill side: offers held blocks and serves pulls. Methods are thread-safe and never block long."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """"host:port" that receivers connect to."""

    @abc.abstractmethod
    def offer(
        self,
        transfer_id: str,
        block_ids: list[int],
        num_tokens: int,
        lease_seconds: float,
        trace_context: dict[str, str] | None = None,
        block_hashes: tuple[bytes, ...] = (),
    ) -> KVHandle:
        """Holds `block_ids` for one pull until acked, cancelled or `lease_seconds` pass; the handle
        carries `block_hashes` (the full blocks' chained hashes) for receivers that reuse blocks."""

    @abc.abstractmethod
    def cancel(self, transfer_id: str) -> bool:
        """Releases an offer with CANCELLED; False if it was already released. Idempotent."""

    @property
    @abc.abstractmethod
    def num_pending(self) -> int:
        """Offers not released yet (offered or being pulled)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stops serving; every pending offer is released with CANCELLED before this returns."""


class KVReceiver(abc.ABC):
    """Decode side: pulls offered KV into caller-owned tensors. Methods are thread-safe and non-blocking."""

    def __init__(self, layout: KVLayout, timeout_seconds: float = TRANSFER_TIMEOUT_SECONDS,
                 connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS) -> None:
        if timeout_seconds <= 0 or connect_timeout_seconds <= 0:
            raise ValueError("timeout_seconds and connect_timeout_seconds must be positive")
        self.layout = layout
        self._timeout_seconds = timeout_seconds
        self._connect_timeout_seconds = connect_timeout_seconds
        self._is_closed = False

    def _new_ticket(self, handle: KVHandle, destination: torch.Tensor, first_block_index: int) -> TransferTicket:
        """What every `begin` does first: refuse when closed, check the destination, open a ticket."""
        if self._is_closed:
            raise KVTransferError("receiver is closed")
        check_destination(self.layout, handle, destination, first_block_index)
        return TransferTicket(handle, destination, first_block_index)

    @abc.abstractmethod
    def begin(
        self,
        handle: KVHandle,
        destination: torch.Tensor,
        trace_context: dict[str, str] | None = None,
        first_block_index: int = 0,
    ) -> TransferTicket:
        """Starts pulling blocks [first_block_index, handle.num_blocks) of `handle` into `destination`
        [L, 2, n, BS, Hkv, D] (n = the blocks pulled); raises ValueError on a bad destination or index.

        The bytes land outside any CUDA stream's order: no queued kernel may still use `destination`'s
        memory (a `KVPool.new_transfer_buffer` once ready, or synchronize first)."""

    def poll(self, ticket: TransferTicket) -> TransferState:
        return ticket.state

    def wait(self, ticket: TransferTicket, timeout: float | None = None) -> TransferStats:
        return ticket.wait(timeout)

    @abc.abstractmethod
    def close(self) -> None:
        """Drops connections; transfers still in flight fail with KVTransferError."""
