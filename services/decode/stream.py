"""One `DecodeStream`: many requests of one caller (a frontend) multiplexed over a single gRPC stream.

    caller ──DecodeStreamRequest(decode(s) | abort)───►  read_requests ──► DecodeWorker.submit / cancel
    caller ◄──DecodeStreamResponse(columns, updates)──  responses     ◄── deliver ◄── engine mailbox

The engine thread hands a whole step's tokens to the loop at once (its mailbox); `deliver` adds each
item to the `_Outbox`, and `responses` sends everything pending as ONE message. At 512 running streams
that is one gRPC write per step instead of 512: per-token Python work in the decode worker's event
loop is what limited the per-request `Decode` calls. For the same reason the common item, new tokens
without logprobs, costs two list appends (the message's token columns), not a `DecodeUpdate` each;
tokens with logprobs, finals and errors are `DecodeUpdate`s (layout in protos/worker.proto).

Each request still gets its own `/tandem.worker.v1.DecodeWorker/Decode` SERVER span, parented on the
trace context its DecodeRequest carries, so a request is one trace whichever call brought it. When the
stream ends (the caller went away or cancelled), every request still open on it is freed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from common import tracing
from protos import worker_pb2
from services.common.engine_thread import Mailbox
from services.common.errors import InvalidRequest, Unavailable, status_for
from services.decode.jobs import DecodeFinal, DecodeJob, TokenBatch
from services.decode.worker import DecodeWorker

logger = logging.getLogger(__name__)

DECODE_SPAN_NAME = "/tandem.worker.v1.DecodeWorker/Decode"  # the same name a Decode call's span has


class _StreamSink:
    """A job's sink that hands its items to the stream (on the stream's loop, after the engine flushes)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, mailbox: Mailbox, deliver, job: DecodeJob):
        self._loop, self._mailbox, self._deliver, self._job = loop, mailbox, deliver, job

    def put(self, item) -> None:
        self._mailbox.post(self._loop, self._deliver, (self._job, item))


class _Outbox:
    """The next DecodeStreamResponse, filled item by item. A request's tokens go in the token columns
    until the request has a DecodeUpdate in this message, as DecodeUpdates after that: the reader takes
    a request's column tokens before its updates, so each request's order is kept."""

    def __init__(self):
        self._clear()

    def _clear(self) -> None:
        self.token_request_ids: list[str] = []  # [num_column_tokens]
        self.token_ids: list[int] = []  # [num_column_tokens]
        self.updates: list[worker_pb2.DecodeUpdate] = []
        self._requests_in_updates: set[str] = set()

    def add_column_tokens(self, request_id: str, token_ids: list[int]) -> bool:
        """Adds new token ids (no logprobs) to the columns; False when the request already has a
        DecodeUpdate in this message (its tokens must then follow as a DecodeUpdate)."""
        if request_id in self._requests_in_updates:
            return False
        if len(token_ids) == 1:  # the common case: one token per request per step
            self.token_request_ids.append(request_id)
            self.token_ids.append(token_ids[0])
        else:
            self.token_request_ids += [request_id] * len(token_ids)
            self.token_ids += token_ids
        return True

    def add_update(self, update: worker_pb2.DecodeUpdate) -> None:
        self.updates.append(update)
        self._requests_in_updates.add(update.request_id)

    def is_empty(self) -> bool:
        return not (self.token_ids or self.updates)

    def take(self) -> worker_pb2.DecodeStreamResponse:
        """Everything added since the last take, as one message; the outbox is empty afterwards."""
        message = worker_pb2.DecodeStreamResponse(updates=self.updates, token_request_ids=self.token_request_ids,
                                                  token_ids=self.token_ids)
        self._clear()
        return message


class DecodeStreamSession:
    def __init__(self, worker: DecodeWorker, job_from_pb, to_pb):
        """`job_from_pb(DecodeRequest) -> DecodeJob` checks every field; `to_pb(item)` builds a
        TokenBatch or DecodeFinal message."""
        self._worker = worker
        self._job_from_pb = job_from_pb
        self._to_pb = to_pb
        self._loop = asyncio.get_running_loop()
        self._live: dict[str, DecodeJob] = {}  # requests of this stream not yet ended
        self._spans: dict[str, trace.Span] = {}
        self._outbox = _Outbox()
        self._wakeup = asyncio.Event()
        self._is_reading = True

    async def read_requests(self, requests: AsyncIterator[worker_pb2.DecodeStreamRequest]) -> None:
        try:
            async for message in requests:
                kind = message.WhichOneof("kind")
                if kind == "decode":
                    self._start(message.decode)
                elif kind == "decodes":
                    for request in message.decodes.requests:
                        self._start(request)
                elif kind == "abort":
                    job = self._live.get(message.abort.request_id)
                    if job is not None:
                        self._worker.cancel(job)
        except Exception as error:  # noqa: BLE001 - the caller's side broke: the stream ends, requests are freed
            logger.debug("DecodeStream caller went away: %r", error)
        finally:
            self._is_reading = False
            self._wakeup.set()

    async def responses(self) -> AsyncIterator[worker_pb2.DecodeStreamResponse]:
        """One message per wake-up with every update since the last; ends once the caller stopped sending
        and no request is open."""
        while self._is_reading or self._live or not self._outbox.is_empty():
            await self._wakeup.wait()
            self._wakeup.clear()
            if not self._outbox.is_empty():
                yield self._outbox.take()

    def close(self) -> None:
        """The stream ended: free every request still open on it."""
        for job in list(self._live.values()):
            self._worker.cancel(job)
            self._end(job.request_id, "the decode stream closed")

    def _start(self, request: worker_pb2.DecodeRequest) -> None:
        arrived_at = time.monotonic()
        request_id = request.request_id
        parent = tracing.extract_context(dict(request.trace_context))
        span = self._worker.obs.tracing.tracer.start_span(DECODE_SPAN_NAME, context=parent,
                                                          kind=trace.SpanKind.SERVER)
        try:
            if not self._worker.is_alive:
                raise Unavailable("decode worker's engine has stopped")
            if request_id in self._live:
                raise InvalidRequest("request_id", f"{request_id!r} is already in use on this stream")
            job = self._job_from_pb(request)
            job.enqueued_at = arrived_at
            job.trace_parent = trace.set_span_in_context(span)
            enqueued = self._worker.submit(job, _StreamSink(self._loop, self._worker.thread.mailbox,
                                                            self._deliver, job))
        except Exception as error:  # noqa: BLE001 - bad input fails this request, not the stream
            self._fail(request_id, span, error)
            return
        self._live[request_id] = job
        self._spans[request_id] = span
        enqueued.add_done_callback(lambda future: self._loop.call_soon_threadsafe(self._on_enqueued, job, future))

    def _on_enqueued(self, job: DecodeJob, future) -> None:
        error = future.exception()
        if error is not None and self._live.get(job.request_id) is job:
            self._fail(job.request_id, self._spans.pop(job.request_id, None), error)
            del self._live[job.request_id]

    def _deliver(self, job_and_item) -> None:  # on the loop, once per item, in the engine's order
        job, item = job_and_item
        if self._live.get(job.request_id) is not job:
            return  # ended already (aborted, or the stream closed)
        if isinstance(item, TokenBatch):
            if not item.logprobs and self._outbox.add_column_tokens(job.request_id, item.token_ids):
                self._wakeup.set()
            else:
                self._push(worker_pb2.DecodeUpdate(request_id=job.request_id, tokens=self._to_pb(item)))
            return
        if isinstance(item, DecodeFinal):
            self._push(worker_pb2.DecodeUpdate(request_id=job.request_id, final=self._to_pb(item)))
            self._end(job.request_id)
            return
        del self._live[job.request_id]
        self._fail(job.request_id, self._spans.pop(job.request_id, None), item)

    def _fail(self, request_id: str, span: trace.Span | None, error: BaseException) -> None:
        code, message = status_for(error)
        if code == grpc.StatusCode.INTERNAL:
            logger.error("DecodeStream request_id=%s failed", request_id, exc_info=error)
        self._push(worker_pb2.DecodeUpdate(request_id=request_id,
                                           error=worker_pb2.RequestError(code=code.value[0], message=message)))
        if span is not None:
            tracing.set_error(span, error)
            span.end()

    def _end(self, request_id: str, error: str | None = None) -> None:
        self._live.pop(request_id, None)
        span = self._spans.pop(request_id, None)
        if span is not None:
            if error is not None:
                tracing.set_error(span, error)
            span.end()

    def _push(self, update: worker_pb2.DecodeUpdate) -> None:
        self._outbox.add_update(update)
        self._wakeup.set()
