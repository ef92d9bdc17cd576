"""Prefill -> decode KV hand-off: the interface (base.py) and its backends, chosen by name.

    sender = create_sender("ucx", layout, kv_pool.gather_blocks, on_release, host="10.0.0.5")
    handle = sender.offer(new_transfer_id(), block_ids, num_tokens, lease_seconds=30.0)
    receiver = create_receiver("ucx", layout)
    ticket = receiver.begin(handle, destination)   # then receiver.poll(ticket) each engine step
    ticket = receiver.begin(handle, destination, first_block_index=k)   # blocks k.. only (k held already)

The interface's names (base.py) load on first use: a process that only reads handles and errors
(the frontend) imports this package without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from common.kv.layout import KVLayout
from common.lazy_names import lazy_names
from common.transfer.errors import (
    KVInvalidPull,
    KVLayoutMismatch,
    KVSizeMismatch,
    KVTransferError,
    KVTransferNotFound,
    KVTransferTimeout,
)
from common.transfer.handle import (
    CONNECT_TIMEOUT_SECONDS,
    TRANSFER_TIMEOUT_SECONDS,
    KVHandle,
    TransferStats,
    new_transfer_id,
)

if TYPE_CHECKING:
    from common.transfer.base import Gathered, KVReceiver, KVSender, OnRelease

BACKENDS = ("ucx", "fake")
_INTERFACE_NAMES = ("KVReceiver", "KVSender", "OnRelease", "TransferOutcome", "TransferState", "TransferTicket")
__getattr__ = lazy_names(__name__, {"common.transfer.base": _INTERFACE_NAMES})


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


def create_sender(
    backend: str,
    layout: KVLayout,
    gather_blocks: Callable[[list[int]], Gathered],
    on_release: OnRelease,
    host: str | None = None,
    port: int = 0,
    ack_timeout_seconds: float = TRANSFER_TIMEOUT_SECONDS,
) -> KVSender:
    """A prefill-side sender; `host` is the address receivers dial (default 127.0.0.1, or "fake")."""
    _check_backend(backend)
    if backend == "ucx":
        from common.transfer.ucx import UcxKVSender  # imports ucxx only when used

        return UcxKVSender(layout, gather_blocks, on_release, host or "127.0.0.1", port, ack_timeout_seconds)
    from common.transfer.fake import FakeKVSender

    return FakeKVSender(layout, gather_blocks, on_release, host or "fake", port, ack_timeout_seconds)


def create_receiver(
    backend: str, layout: KVLayout, timeout_seconds: float = TRANSFER_TIMEOUT_SECONDS,
    connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS,
) -> KVReceiver:
    """A decode-side receiver for KV laid out as `layout`."""
    _check_backend(backend)
    if backend == "ucx":
        from common.transfer.ucx import UcxKVReceiver

        return UcxKVReceiver(layout, timeout_seconds, connect_timeout_seconds)
    from common.transfer.fake import FakeKVReceiver

    return FakeKVReceiver(layout, timeout_seconds, connect_timeout_seconds)


__all__ = [
    "BACKENDS",
    "CONNECT_TIMEOUT_SECONDS",
    "TRANSFER_TIMEOUT_SECONDS",
    "KVHandle",
    "KVInvalidPull",
    "KVLayout",
    "KVLayoutMismatch",
    "KVReceiver",
    "KVSender",
    "KVSizeMismatch",
    "KVTransferError",
    "KVTransferNotFound",
    "KVTransferTimeout",
    "OnRelease",
    "TransferOutcome",
    "TransferState",
    "TransferStats",
    "TransferTicket",
    "create_receiver",
    "create_sender",
    "new_transfer_id",
]
