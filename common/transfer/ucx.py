"""The real KV hand-off over UCX (ucxx): GPU memory goes device to device, host memory over tcp/shm.

Per pull, on one cached endpoint (the framing is in protocol.py):

    receiver (decode)                                    sender (prefill)
    begin(): post recvs of the PullResponse (request_tag) and of the KV bytes (request_tag + 1),
             send PullRequest on the control tag  ───►   claim the offer (validate layout, block range, sizes)
                                                         gather blocks (side CUDA stream, ~0.1 ms)
             PullResponse lands                   ◄───   send PullResponse  } at once, no round
             KV bytes land in the destination     ◄───   send KV bytes      } trip between them
             send Ack on the control tag          ───►   OfferBook.finish -> on_release(DONE)

Both receives are posted before the pull leaves, so the bytes never wait in UCX's unexpected queue
and the hand-off costs one round trip plus the copy. A refused pull aborts the receiver's endpoint
(its KV receive can never match) and the next pull reconnects; refusals are rare.

Each pull has its own random request_tag, so many pulls share one endpoint concurrently. Every
ucxx call runs on the process-wide UcxRuntime loop; public methods are thread-safe.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
import threading
import time
from typing import Any, Callable

import torch

from common.kv.layout import KVLayout
from common.transfer import protocol
from common.transfer.base import Gathered, KVReceiver, OnRelease, TransferTicket, as_bytes, check_gathered
from common.transfer.errors import KVTransferError, KVTransferTimeout
from common.transfer.handle import (
    CONNECT_TIMEOUT_SECONDS,
    TRANSFER_TIMEOUT_SECONDS,
    KVHandle,
    TransferStats,
    split_address,
)
from common.transfer.offers import BookedSender, Offer
from common.transfer.ucx_runtime import UcxRuntime, endpoint_transport, ucx_buffer

logger = logging.getLogger(__name__)

_GATHER_POLL_SECONDS = 0.0002  # how often a pull whose gather is still on the device checks it


def _consume_outcome(task: asyncio.Future) -> None:
    """Marks an abandoned receive's error as seen (it failed because its endpoint was aborted)."""
    if not task.cancelled():
        task.exception()


def _memory_type(tensor: torch.Tensor) -> str:
    return "cuda" if tensor.is_cuda else "host"


class UcxKVSender(BookedSender):
    """Prefill side: a UCX listener serving pulls of offered blocks.

    UCX listens on all interfaces, whatever `host` is: ucxx's `create_listener(callback, port)` takes
    no address (the C++ ListenerBuilder can bind one; ucxx 0.52's Python binding does not expose it).
    `host` is only what goes into `address` for receivers to dial. What guards the port instead: a
    pull must name a live transfer id (128 random bits), and a refused pull leaves the offer alone.
    """

    def __init__(
        self,
        layout: KVLayout,
        gather_blocks: Callable[[list[int]], Gathered],
        on_release: OnRelease,
        host: str = "127.0.0.1",
        port: int = 0,
        ack_timeout_seconds: float = TRANSFER_TIMEOUT_SECONDS,
    ) -> None:
        if not 0 <= port < 65536:
            raise ValueError(f"port: must be in [0, 65535], got {port}")
        super().__init__(layout, gather_blocks, on_release, ack_timeout_seconds)
        self._ack_timeout_seconds = ack_timeout_seconds
        # SO_REUSEADDR on the listener: a restarted worker gets its port back at once, not a minute
        # later when its predecessor's connections leave TIME_WAIT (a live listener still holds the
        # port). UCX reads it when this process's context is created, i.e. by its first sender.
        os.environ.setdefault("UCX_TCP_CM_REUSEADDR", "y")
        self._runtime = UcxRuntime.get()
        # transfer_id -> (endpoint that pulled it, its ack); loop thread only
        self._ack_waiters: dict[str, tuple[Any, asyncio.Future]] = {}
        self._tasks: set[asyncio.Task] = set()  # connection handlers and pulls being served
        self._endpoints: set[Any] = set()
        self._is_closed = False
        try:
            self._listener = self._runtime.run(self._listen(port), timeout=30)
        except Exception as error:
            self._book.close()
            raise KVTransferError(f"port: cannot listen on {port}: {error!r}") from None
        self._address = f"{host}:{self._listener.port}"

    def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        try:
            self._runtime.run(self._shutdown(), timeout=30)
        finally:
            self._book.close()

    async def _listen(self, port: int) -> Any:
        return self._runtime.ucxx.create_listener(self._on_connect, port)

    async def _shutdown(self) -> None:
        self._listener.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for endpoint in list(self._endpoints):
            endpoint.abort()
        self._endpoints.clear()

    def _track(self, coroutine: Any) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _on_connect(self, endpoint: Any) -> None:
        """Reads control frames from one receiver until it disconnects."""
        if self._is_closed:
            endpoint.abort()
            return
        self._endpoints.add(endpoint)
        self._tasks.add(asyncio.current_task())
        try:
            while True:
                frame = protocol.new_frame_buffer()
                await endpoint.recv(frame)
                message = protocol.decode_frame(frame)
                kind = message.WhichOneof("body")
                if kind == "pull_request":
                    self._track(self._serve(endpoint, message.pull_request))
                elif kind == "ack":
                    puller, waiter = self._ack_waiters.get(message.ack.transfer_id, (None, None))
                    if puller is endpoint and not waiter.done():  # only the puller may ack
                        waiter.set_result(message.ack.ok)
                else:
                    raise protocol.KVProtocolError(f"unexpected {kind} on the control tag")
        except asyncio.CancelledError:
            raise
        except protocol.KVProtocolError as error:
            logger.warning("dropping KV receiver connection: %s", error)
            endpoint.abort()
        except Exception as error:  # the receiver went away (UCX reports it as an endpoint error)
            logger.debug("KV receiver connection ended: %r", error)
        finally:
            self._endpoints.discard(endpoint)
            self._tasks.discard(asyncio.current_task())

    async def _serve(self, endpoint: Any, request: Any) -> None:
        try:
            pull = protocol.pull_from_message(request)
            offer, block_ids = self._claim(pull)
        except KVTransferError as error:
            await self._refuse(endpoint, request.request_tag, error)
            return
        self._ack_waiters[pull.transfer_id] = (endpoint, asyncio.get_running_loop().create_future())
        try:
            await self._send_offer(endpoint, pull, offer, block_ids)
        except Exception as error:
            logger.warning("KV send of %s failed: %r", pull.transfer_id, error)
            self._book.finish(pull.transfer_id, False)
        finally:
            self._ack_waiters.pop(pull.transfer_id, None)

    async def _send_offer(self, endpoint: Any, pull: protocol.Pull, offer: Offer, block_ids: list[int]) -> None:
        """Sends `block_ids` (the offer's blocks the pull asked for) and waits for the ack."""
        start = time.monotonic()
        try:
            gathered = await self._gather(block_ids)
        except Exception as error:
            await self._refuse(endpoint, pull.response_tag, KVTransferError(f"gather failed: {error}"))
            raise
        data = as_bytes(gathered)  # [num_bytes] uint8 view
        await asyncio.gather(  # the receiver posted both receives before it pulled
            self._respond(endpoint, pull.response_tag, protocol.response_ok(data.numel())),
            endpoint.send(ucx_buffer(data), tag=pull.data_tag),
        )
        seconds = time.monotonic() - start
        try:
            is_ok = await asyncio.wait_for(self._ack_waiters[pull.transfer_id][1], self._ack_timeout_seconds)
        except asyncio.TimeoutError:
            return  # the OfferBook's own ack deadline releases it FAILED
        stats = TransferStats(
            num_bytes=data.numel(),
            num_blocks=len(block_ids),
            seconds=seconds,
            transport=endpoint_transport(endpoint, _memory_type(gathered)),
            trace_context=offer.trace_context,
            peer_trace_context=pull.trace_context,
            num_reused_blocks=pull.first_block_index,
        )
        self._book.finish(pull.transfer_id, is_ok, stats)

    async def _gather(self, block_ids: list[int]) -> torch.Tensor:
        """[L, 2, n, BS, Hkv, D], complete. A gather still running on the device (a KVPool.start_gather
        buffer) is polled, never waited for: the loop goes on serving other pulls meanwhile."""
        gathered = self._gather_blocks(block_ids)
        if not isinstance(gathered, torch.Tensor):
            while not gathered.is_ready():
                await asyncio.sleep(_GATHER_POLL_SECONDS)
            gathered = gathered.tensor
        check_gathered(self.layout, len(block_ids), gathered)
        return gathered

    async def _respond(self, endpoint: Any, tag: int, message: Any) -> None:
        await endpoint.send(protocol.encode_frame(message), tag=tag)

    async def _refuse(self, endpoint: Any, tag: int, error: KVTransferError) -> None:
        """Best effort: a receiver that is gone (or sent no usable tag) cannot be told."""
        if not 0 < tag < protocol.MAX_REQUEST_TAG:
            return
        try:
            await self._respond(endpoint, tag, protocol.response_error(error))
        except Exception as send_error:
            logger.debug("could not refuse a pull: %r", send_error)


class UcxKVReceiver(KVReceiver):
    """Decode side: pulls offered KV into caller-owned tensors; endpoints cached per sender address.

    A transfer past `timeout_seconds` fails with KVTransferTimeout and its endpoint is aborted (so
    no late bytes land in the destination); other pulls on that endpoint fail with it.
    """

    def __init__(self, layout: KVLayout, timeout_seconds: float = TRANSFER_TIMEOUT_SECONDS,
                 connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS) -> None:
        super().__init__(layout, timeout_seconds, connect_timeout_seconds)
        self._runtime = UcxRuntime.get()
        self._endpoints: dict[str, Any] = {}  # loop thread only
        self._connect_locks: dict[str, asyncio.Lock] = {}
        self._pulls: dict[concurrent.futures.Future, TransferTicket] = {}
        self._pulls_lock = threading.Lock()

    def begin(
        self,
        handle: KVHandle,
        destination: torch.Tensor,
        trace_context: dict[str, str] | None = None,
        first_block_index: int = 0,
    ) -> TransferTicket:
        ticket = self._new_ticket(handle, destination, first_block_index)
        future = self._runtime.submit(self._pull(ticket, dict(trace_context or {})))
        with self._pulls_lock:
            self._pulls[future] = ticket
        future.add_done_callback(self._forget_pull)
        return ticket

    def _forget_pull(self, future: concurrent.futures.Future) -> None:
        with self._pulls_lock:
            self._pulls.pop(future, None)

    def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        with self._pulls_lock:
            pulls = list(self._pulls.items())
        for future, ticket in pulls:
            future.cancel()  # a pull that never started would otherwise leave its ticket PENDING
            ticket.set_failed(KVTransferError("receiver closed before the transfer finished"))
        self._runtime.run(self._drop_all(), timeout=30)

    async def _drop_all(self) -> None:
        for address, endpoint in list(self._endpoints.items()):
            self._discard(address, [endpoint])

    def _discard(self, address: str, used: list[Any]) -> None:
        """Aborts the endpoint a failed pull used (cancelling its posted receives) and uncaches it."""
        for endpoint in used:
            if self._endpoints.get(address) is endpoint:
                del self._endpoints[address]
            endpoint.abort()

    async def _pull(self, ticket: TransferTicket, trace_context: dict[str, str]) -> None:
        address = ticket.handle.address
        used: list[Any] = []  # the endpoint this pull talks over, once connected
        try:
            steps = self._pull_steps(ticket, trace_context, used)
            ticket.set_done(await asyncio.wait_for(steps, self._timeout_seconds))
        except asyncio.TimeoutError:
            self._discard(address, used)
            ticket.set_failed(KVTransferTimeout(f"transfer {ticket.transfer_id} took over {self._timeout_seconds}s"))
        except asyncio.CancelledError:
            self._discard(address, used)
            ticket.set_failed(KVTransferError("receiver closed during the transfer"))
        except KVTransferError as error:  # refused by the sender: the endpoint is fine
            ticket.set_failed(error)
        except Exception as error:  # UCX errors: the endpoint is broken, reconnect next time
            self._discard(address, used)
            ticket.set_failed(KVTransferError(f"UCX transfer from {address} failed: {error!r}"))

    async def _pull_steps(
        self, ticket: TransferTicket, trace_context: dict[str, str], used: list[Any]
    ) -> TransferStats:
        handle = ticket.handle
        endpoint = await self._endpoint(handle.address)
        used.append(endpoint)
        pull = protocol.new_pull(handle, self.layout, trace_context, ticket.first_block_index)
        start = time.monotonic()
        frame = protocol.new_frame_buffer()
        data = as_bytes(ticket.destination)  # [num_bytes] uint8 view of the destination
        response_received = asyncio.ensure_future(endpoint.recv(frame, tag=pull.response_tag))
        data_received = asyncio.ensure_future(endpoint.recv(ucx_buffer(data), tag=pull.data_tag))
        try:
            await endpoint.send(protocol.encode_frame(protocol.pull_to_message(pull)))
            await response_received
            message = protocol.decode_frame(frame)
            protocol.expect_body(message, "pull_response")
            response = message.pull_response
            if not response.ok:
                raise protocol.error_from_response(response)
            if response.num_bytes != data.numel():
                await endpoint.send(protocol.encode_frame(protocol.ack_message(handle.transfer_id, False)))
                raise protocol.KVProtocolError(
                    f"sender offers {response.num_bytes} bytes, destination holds {data.numel()}"
                )
            await data_received
        except BaseException:
            if not data_received.done():  # its receive stays posted: only aborting the endpoint ends it
                self._discard(handle.address, used)
            for receive in (response_received, data_received):
                receive.cancel()
                receive.add_done_callback(_consume_outcome)
            raise
        seconds = time.monotonic() - start
        await endpoint.send(protocol.encode_frame(protocol.ack_message(handle.transfer_id, True)))
        return TransferStats(
            num_bytes=data.numel(),
            num_blocks=pull.expected_num_blocks,
            seconds=seconds,
            transport=endpoint_transport(endpoint, _memory_type(ticket.destination)),
            trace_context=trace_context,
            num_reused_blocks=pull.first_block_index,
        )

    async def _endpoint(self, address: str) -> Any:
        """The cached endpoint to `address`, connecting once even when many pulls start together."""
        endpoint = self._endpoints.get(address)
        if endpoint is not None and not endpoint.closed:
            return endpoint
        lock = self._connect_locks.setdefault(address, asyncio.Lock())
        async with lock:
            endpoint = self._endpoints.get(address)
            if endpoint is not None and not endpoint.closed:
                return endpoint
            host, port = split_address(address)
            try:
                ip = await asyncio.get_running_loop().run_in_executor(None, socket.gethostbyname, host)
                endpoint = await self._runtime.ucxx.create_endpoint(
                    ip, port, connect_timeout=self._connect_timeout_seconds
                )
            except Exception as error:
                raise KVTransferError(f"cannot connect to KV sender at {address}: {error!r}") from None
            self._endpoints[address] = endpoint
            return endpoint
