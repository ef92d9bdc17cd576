"""The frontend's end of `DecodeStream`: one long-lived stream per decode worker, shared by every request
this frontend sends there, demultiplexed into one queue per request.

    Relay ──start(DecodeRequest)──► DecodeStreamClient ──writer task──► decode worker (one gRPC stream)
    Relay ◄──take queued items── per-request queue ◄── reader task ◄── DecodeStreamResponse(columns, updates)

Requests go out the same way, batched: `start` queues a request and returns; one writer task per stream
sends everything queued while its previous write was in flight as one message (`decodes`). A prefill
step hands off many requests at once, and a write per request, each waiting its turn on a busy event
loop, delayed the last of them by hundreds of milliseconds.
A worker's message carries a whole engine step (every request's new tokens), so the frontend reads one
message per step per worker instead of one per request. Tokens without logprobs come in the message's
token columns and are queued as plain ints (no sub-message to parse per request and step); a request's
column tokens are queued before its DecodeUpdates of the same message, as the proto's layout says. The
relay takes all of a request's queued items at once, so a request whose client (or the event loop) fell
behind sends them as one message.
A request's error comes back as a `RequestError` in its own update and is raised as
`WorkerRequestError` with the worker's status code; the stream itself failing (worker gone) fails every
request on it with that status, and the next request opens a new stream.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import grpc

from protos import worker_pb2
from services.common.errors import ServiceError

logger = logging.getLogger(__name__)


class WorkerRequestError(ServiceError):
    """A decode worker failed one request (or its whole stream); carries the worker's status code."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def error_from_pb(error: worker_pb2.RequestError) -> WorkerRequestError:
    return WorkerRequestError(_CODES.get(error.code, grpc.StatusCode.UNKNOWN), error.message)


@dataclass
class RequestUpdates:
    """The updates of one request on a stream, in order; the last is a final or an error."""

    request_id: str
    registry: dict  # the stream's open requests, this one included until it ends or is forgotten
    # int (a new token id without logprobs) | DecodeUpdate | WorkerRequestError
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)

    async def take(self, timeout_seconds: float | None) -> list[int | worker_pb2.DecodeUpdate | WorkerRequestError]:
        """Every item queued since the last take, in order, waiting for one if none is; raises
        asyncio.TimeoutError past the timeout. A stream failure is the last item (raised by the caller)."""
        items = []
        if self.queue.empty() and timeout_seconds is None:  # no deadline (HTTP): no timer to arm
            items.append(await self.queue.get())
        elif self.queue.empty():
            async with asyncio.timeout(timeout_seconds):
                items.append(await self.queue.get())
        while not self.queue.empty():
            items.append(self.queue.get_nowait())
        return items

    def forget(self) -> None:
        """The caller is done with this request (finished, or aborted through the worker's Abort)."""
        if self.registry.get(self.request_id) is self:
            del self.registry[self.request_id]


class _Stream:
    """One open DecodeStream call and the requests sent on it."""

    def __init__(self, call):
        self.call = call
        self.requests: dict[str, RequestUpdates] = {}
        self.reader: asyncio.Task | None = None
        self.unsent: list[worker_pb2.DecodeRequest] = []  # started, for the writer's next message
        self.writer: asyncio.Task | None = None  # running while anything is unsent or being written
        self.is_broken = False  # a write failed: no more writes, the next request opens a new stream


class DecodeStreamClient:
    def __init__(self, stub, address: str):
        self.stub = stub  # the worker's DecodeWorkerStub (on its channel)
        self.address = address
        self._stream: _Stream | None = None

    async def start(self, request: worker_pb2.DecodeRequest) -> RequestUpdates:
        """Queues `request` for the stream (opening it if needed); its updates, or the stream's failure
        should the write fail, arrive on the result."""
        stream = self._open()
        if request.request_id in stream.requests:
            raise WorkerRequestError(grpc.StatusCode.INVALID_ARGUMENT,
                                     f"request_id: {request.request_id!r} is already in use")
        updates = stream.requests[request.request_id] = RequestUpdates(request.request_id, stream.requests)
        stream.unsent.append(request)
        if stream.writer is None:
            stream.writer = asyncio.get_running_loop().create_task(self._write(stream))
        return updates

    async def _write(self, stream: _Stream) -> None:
        """Sends what is unsent, one message per write (grpc.aio allows one write in flight per call),
        until nothing is left; a failed write fails the requests it carried and every later one."""
        try:
            while stream.unsent:
                batch, stream.unsent = stream.unsent, []
                message = (worker_pb2.DecodeStreamRequest(decode=batch[0]) if len(batch) == 1 else
                           worker_pb2.DecodeStreamRequest(decodes=worker_pb2.DecodeRequestBatch(requests=batch)))
                try:
                    await stream.call.write(message)
                except BaseException as error:  # the call ended or broke (the reader sees it too)
                    stream.is_broken = True
                    stream.call.cancel()  # ends its reader too
                    if self._stream is stream:
                        self._stream = None
                    failure = WorkerRequestError(grpc.StatusCode.UNAVAILABLE,
                                                 f"decode stream to {self.address} failed: {error!r}")
                    for request in batch + stream.unsent:
                        updates = stream.requests.pop(request.request_id, None)
                        if updates is not None:
                            updates.queue.put_nowait(failure)
                    stream.unsent.clear()
                    if isinstance(error, asyncio.CancelledError):
                        raise
                    return
        finally:
            stream.writer = None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.call.cancel()
        self._stream = None

    def _open(self) -> _Stream:
        if self._stream is None or self._stream.call.done() or self._stream.is_broken:
            self._stream = _Stream(self.stub.DecodeStream())
            self._stream.reader = asyncio.get_running_loop().create_task(self._read(self._stream))
        return self._stream

    async def _read(self, stream: _Stream) -> None:
        failure = WorkerRequestError(grpc.StatusCode.UNAVAILABLE, f"decode stream to {self.address} closed")
        try:
            async for response in stream.call:
                if len(response.token_request_ids) != len(response.token_ids):
                    stream.call.cancel()
                    failure = WorkerRequestError(grpc.StatusCode.INTERNAL, (
                        f"decode worker {self.address} sent {len(response.token_ids)} column token ids for "
                        f"{len(response.token_request_ids)} request ids"))
                    return
                _dispatch(response, stream.requests)
            failure = WorkerRequestError(grpc.StatusCode.UNAVAILABLE, f"decode stream to {self.address} ended")
        except grpc.aio.AioRpcError as error:
            failure = WorkerRequestError(error.code(), f"decode stream to {self.address} failed: "
                                                       f"{error.details() or error.code().name}")
        finally:
            if self._stream is stream:
                self._stream = None
            for updates in list(stream.requests.values()):
                updates.queue.put_nowait(failure)
            stream.requests.clear()


def _dispatch(response: worker_pb2.DecodeStreamResponse, requests: dict[str, RequestUpdates]) -> None:
    """Queues a message's items on their requests: column tokens first, then updates (see the proto);
    a final or error ends its request. Requests the caller already let go of are skipped."""
    if response.token_ids:
        get = requests.get
        for request_id, token_id in zip(response.token_request_ids, response.token_ids):
            updates = get(request_id)
            if updates is not None:
                updates.queue.put_nowait(token_id)
    for update in response.updates:
        updates = requests.get(update.request_id)
        if updates is None:
            continue
        if update.WhichOneof("kind") != "tokens":
            del requests[update.request_id]
        updates.queue.put_nowait(update)
