"""In-process KV hand-off for unit tests of the services: no network, same semantics as ucx.py.

Senders register under their address in a process-wide registry; a receiver's `begin` runs the
whole pull at once (encode and validate the pull request, claim the offer, gather, copy, ack), so
its ticket is already DONE or FAILED when `begin` returns. Leases, layout checks and releases go
through the same OfferBook as the UCX backend.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import Callable

import torch

from common.kv.layout import KVLayout
from common.transfer import protocol
from common.transfer.base import Gathered, KVReceiver, OnRelease, TransferTicket, check_gathered, gathered_tensor
from common.transfer.errors import KVTransferError, KVTransferTimeout
from common.transfer.handle import TRANSFER_TIMEOUT_SECONDS, KVHandle, TransferStats
from common.transfer.offers import BookedSender

_registry: dict[str, "FakeKVSender"] = {}
_registry_lock = threading.Lock()
_next_port = itertools.count(1)


class FakeKVSender(BookedSender):
    """Prefill side, in process; port 0 picks an unused fake port."""

    def __init__(
        self,
        layout: KVLayout,
        gather_blocks: Callable[[list[int]], Gathered],
        on_release: OnRelease,
        host: str = "fake",
        port: int = 0,
        ack_timeout_seconds: float = TRANSFER_TIMEOUT_SECONDS,
    ) -> None:
        super().__init__(layout, gather_blocks, on_release, ack_timeout_seconds)
        with _registry_lock:
            while port == 0 or f"{host}:{port}" in _registry:
                if port != 0:
                    self._book.close()
                    raise KVTransferError(f"port: cannot listen on {port}: {host}:{port} is already in use")
                port = next(_next_port)
            self._address = f"{host}:{port}"
            _registry[self._address] = self

    def close(self) -> None:
        with _registry_lock:
            if _registry.get(self._address) is self:
                del _registry[self._address]
        self._book.close()

    def serve(self, pull: protocol.Pull, destination: torch.Tensor) -> tuple[float, Callable[[bool], None]]:
        """Claims, gathers and copies into `destination`; returns (seconds, ack)."""
        offer, block_ids = self._claim(pull)
        start = time.monotonic()
        try:
            gathered = gathered_tensor(self._gather_blocks(block_ids))  # [L, 2, n, BS, Hkv, D]: only the blocks pulled
            check_gathered(self.layout, len(block_ids), gathered)
            destination.copy_(gathered)
        except Exception as error:
            self._book.finish(pull.transfer_id, False)
            raise error if isinstance(error, KVTransferError) else KVTransferError(f"gather failed: {error}")
        seconds = time.monotonic() - start
        stats = TransferStats(
            num_bytes=gathered.numel() * gathered.element_size(),
            num_blocks=len(block_ids),
            seconds=seconds,
            transport="fake",
            trace_context=offer.trace_context,
            peer_trace_context=pull.trace_context,
            num_reused_blocks=pull.first_block_index,
        )
        return seconds, lambda is_ok: self._book.finish(pull.transfer_id, is_ok, stats)


class FakeKVReceiver(KVReceiver):
    """Decode side, in process: `begin` completes the pull before returning."""

    def begin(
        self,
        handle: KVHandle,
        destination: torch.Tensor,
        trace_context: dict[str, str] | None = None,
        first_block_index: int = 0,
    ) -> TransferTicket:
        ticket = self._new_ticket(handle, destination, first_block_index)
        pull = protocol.new_pull(handle, self.layout, dict(trace_context or {}), first_block_index)
        # Round-trip through the wire format so the fake validates exactly what UCX would.
        message = protocol.decode_frame(protocol.encode_frame(protocol.pull_to_message(pull)))
        with _registry_lock:
            sender = _registry.get(handle.address)
        try:
            if sender is None:
                raise KVTransferError(f"cannot connect to KV sender at {handle.address}: no fake sender there")
            seconds, ack = sender.serve(protocol.pull_from_message(message.pull_request), destination)
        except KVTransferError as error:
            ticket.set_failed(error)
            return ticket
        if seconds > self._timeout_seconds:  # as over UCX: a late transfer is given up, never used
            ack(False)
            ticket.set_failed(KVTransferTimeout(f"transfer {handle.transfer_id} took over {self._timeout_seconds}s"))
            return ticket
        ack(True)
        num_bytes = destination.numel() * destination.element_size()
        ticket.set_done(TransferStats(num_bytes, pull.expected_num_blocks, seconds, "fake", pull.trace_context,
                                      num_reused_blocks=first_block_index))
        return ticket

    def close(self) -> None:
        self._is_closed = True
