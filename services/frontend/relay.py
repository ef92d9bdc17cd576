"""One request's trip through the workers, as a stream of domain events.

    pick workers -> Prefill (unary) -> TokenEvent(token #1)  [sent before any KV moves]
                 -> the decode worker's shared DecodeStream (decode_streams.py) -> TokenEvent(...)* -> FinishEvent
    or, when the path policy keeps the prompt off the prefill workers (request_path.py: no prefill
    worker in the cluster, or a short prompt and a decode worker with room):
    pick a decode-side worker -> its DecodeStream with prefill_here -> TokenEvent(token #1, ...)* -> FinishEvent

Each pick is a `route` span (which worker, of which kind), a sibling of the RPC span that follows it;
the request's part of the DecodeStream has its own `.../DecodeWorker/Decode` CLIENT span.

Whatever ends the stream early (a stop string, client cancel, deadline, Abort, an error) closes the
generator; its `finally` sends Abort to both workers, so every block on every worker is freed. The
aborts run as background tasks: they must not be cancelled with the request. The workers know each run
by an id of its own (the caller's + "@" + random hex), so those late Aborts only ever reach the run that
sent them, never a new request the caller started under the same id.

Migration: when the decode worker is lost mid-stream (UNAVAILABLE), the request runs again as a new
attempt, up to `migration_limit` times: Prefill of prompt + every token already sent, with
`num_output_tokens_before` set so seeds, penalties and max_tokens go on where they were, then decode on
a healthy worker. The new prefill's token #1 is the stream's next token, so the caller sees one
seamless stream (nothing repeated, nothing lost).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from common import tracing
from common.engine.sampling_params import SamplingParams
from common.engine.sequence import TokenLogprobs
from common.tracing import Attr, SpanName
from protos import worker_pb2
from services.common.errors import MAX_REQUEST_ID_LENGTH, DeadlineExceeded, ServiceError
from services.common.worker_messages import FINISH_REASON_FROM_PB, logprobs_from_pb, sampling_to_pb
from services.frontend.decode_streams import DecodeStreamClient, RequestUpdates, WorkerRequestError, error_from_pb
from services.frontend.router import Router, WorkerHandle
from services.frontend.request_path import PathPolicy, RequestPath, choose_path, has_room

logger = logging.getLogger(__name__)

_ABORT_TIMEOUT_SECONDS = 5.0
DECODE_RPC_SPAN = "/tandem.worker.v1.DecodeWorker/Decode"  # a request's part of a DecodeStream


@dataclass
class TokenEvent:
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None  # one per token when requested


@dataclass
class FinishEvent:
    finish_reason: str  # "stop" | "length"
    matched_stop_token_id: int | None = None


class WorkerStreamError(ServiceError):
    """A worker broke the protocol (e.g. a Decode stream without a final message)."""


class Relay:
    def __init__(self, router: Router, tracing_handle: tracing.TracingHandle | None = None,
                 migration_limit: int = 3, policy: PathPolicy | None = None):
        """`migration_limit`: how many times one request may move off a lost decode worker (0 = never);
        `policy`: when a decode worker prefills a request itself (default: only without prefill workers)."""
        if migration_limit < 0:
            raise ValueError(f"migration_limit: must be >= 0, got {migration_limit}")
        self._router = router
        self._policy = policy or PathPolicy()
        self._migration_limit = migration_limit
        self._tracing = tracing_handle or tracing.init_tracing("frontend", "")
        self._background: set[asyncio.Task] = set()  # abort calls in flight (kept referenced)
        self._decode_streams: dict[str, DecodeStreamClient] = {}  # by decode worker address

    async def run(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        time_remaining: Callable[[], float | None],
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Yields token #1 (from Prefill), the decoded tokens, then one FinishEvent; moves the request to
        other workers when its decode worker is lost mid-stream (see `_can_migrate`).

        The workers know this run as `worker_request_id(request_id)`, an id of its own: the clean-up
        Aborts of an earlier request under the same id (sent in the background once it ended) can then
        never reach this one."""
        request_id = worker_request_id(request_id)
        sampling_pb = sampling_to_pb(sampling)
        touched: list[WorkerHandle] = []  # workers that may hold state for this request
        sent_token_ids: list[int] = []  # every token passed on so far, over all attempts
        num_migrations = 0
        is_finished = False
        try:
            while True:
                try:
                    # An attempt's prompt ends with the tokens sent so far; its token #1 is the next one.
                    attempt = self._attempt(request_id, prompt_token_ids + sent_token_ids, sampling_pb,
                                            time_remaining, touched)
                    async with contextlib.aclosing(attempt):
                        async for event in attempt:
                            is_finished = isinstance(event, FinishEvent)
                            if not is_finished:
                                sent_token_ids += event.token_ids
                            yield event
                    return
                except WorkerRequestError as error:
                    if not self._can_migrate(error, num_migrations):
                        raise
                    num_migrations += 1
                    logger.warning("request %s: %s; migrating it after %d tokens (migration %d of at most %d)",
                                   request_id, error, len(sent_token_ids), num_migrations, self._migration_limit)
                # Frees what the lost attempt holds (the prefill's KV lease) before its id is reused.
                if touched:
                    await asyncio.wait([self._abort_in_background(worker, request_id) for worker in touched])
                touched.clear()
                if len(sent_token_ids) >= sampling.max_tokens:  # only the final was lost
                    is_finished = True
                    yield FinishEvent("length")
                    return
                sampling_pb = _resumed(sampling_pb, len(sent_token_ids))
        finally:
            if not is_finished:
                for worker in touched:
                    self._abort_in_background(worker, request_id)

    def _can_migrate(self, error: WorkerRequestError, num_migrations: int) -> bool:
        """Only a lost decode worker (UNAVAILABLE: stream broken, worker gone or draining) moves a request;
        bad input and overload go to the client as they are."""
        return error.code == grpc.StatusCode.UNAVAILABLE and num_migrations < self._migration_limit

    async def _attempt(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_pb: worker_pb2.SamplingParams,
        time_remaining: Callable[[], float | None],
        touched: list[WorkerHandle],
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        """One pass: prefill -> decode, or the whole request on one worker when the routing policy says so
        (`request_path.py`); appends each worker it reaches to `touched` (the caller aborts them)."""
        local = self._local_worker(request_id, prompt_token_ids)
        if local is not None:
            touched.append(local)
            request = worker_pb2.DecodeRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                               sampling=sampling_pb, prefill_here=True)
            async for event in self._decode(local, request, len(prompt_token_ids), time_remaining):
                yield event
            return
        prefill = self._route(request_id, "prefill", lambda: self._router.pick_prefill(prompt_token_ids))
        touched.append(prefill)
        with self._router.track(prefill, len(prompt_token_ids)):
            response = await self._call(
                prefill,
                prefill.stub.Prefill(
                    worker_pb2.PrefillRequest(
                        request_id=request_id, prompt_token_ids=prompt_token_ids, sampling=sampling_pb
                    ),
                    timeout=time_remaining(),
                ),
            )
        first_logprobs = [logprobs_from_pb(response.first_logprobs)] if response.HasField("first_logprobs") else None
        yield TokenEvent([response.first_token_id], first_logprobs)
        if response.finish_reason != worker_pb2.FINISH_REASON_UNSPECIFIED:
            yield _finish_event(response.finish_reason, [response.first_token_id])
            return
        # picked now: its load is known best after the prefill
        decode = self._route(request_id, "decode", lambda: self._router.pick_decode(prompt_token_ids))
        touched.append(decode)
        request = worker_pb2.DecodeRequest(request_id=request_id, prompt_token_ids=prompt_token_ids,
                                           first_token_id=response.first_token_id, sampling=sampling_pb,
                                           kv_handle=response.kv_handle)
        async for event in self._decode(decode, request, 0, time_remaining):
            yield event

    def _local_worker(self, request_id: str, prompt_token_ids: list[int]) -> WorkerHandle | None:
        """The decode-side worker that prefills this request itself, or None for the disaggregated path."""
        has_prefill_workers = bool(self._router.prefill_workers)
        num_prompt_tokens = len(prompt_token_ids)
        if not self._policy.may_go_local(num_prompt_tokens, has_prefill_workers):
            return None
        choice = self._router.choose_decode(prompt_token_ids)  # recorded only if the prompt stays local
        path = choose_path(self._policy, num_prompt_tokens, has_prefill_workers,
                           has_room(choice.worker.stats, num_prompt_tokens))
        if path is not RequestPath.LOCAL:
            return None  # the decode worker is picked again once the prefill has answered
        return self._route(request_id, "decode", lambda: self._router.commit(choice))

    async def _decode(self, decode: WorkerHandle, request: worker_pb2.DecodeRequest, num_prompt_tokens: int,
                      time_remaining: Callable[[], float | None]) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Sends `request` down the worker's DecodeStream and relays its tokens; `num_prompt_tokens`: the
        prompt tokens the worker computes (0 for a hand-off), counted against it while the request runs."""
        # The request's own span for its part of the worker's shared DecodeStream; a detached span,
        # since a current one could not be kept across this generator's yields.
        decode_span = self._tracing.tracer.start_span(DECODE_RPC_SPAN, kind=trace.SpanKind.CLIENT,
                                                      attributes={Attr.REQUEST_ID: request.request_id})
        request.trace_context.update(tracing.inject_context(trace.set_span_in_context(decode_span)))
        updates: RequestUpdates | None = None
        try:
            with self._router.track(decode, num_prompt_tokens):
                updates = await self._start_decode(decode, request)
                async for event in self._relay_updates(decode, updates, time_remaining):
                    yield event
        except Exception as error:
            tracing.set_error(decode_span, error)
            raise
        finally:
            decode_span.end()
            if updates is not None:
                updates.forget()

    def _route(self, request_id: str, role: str, pick: Callable[[], WorkerHandle]) -> WorkerHandle:
        """One worker pick as a `route` span (ERROR when no worker of that kind is ready)."""
        with self._tracing.start_span(SpanName.ROUTE, attributes={Attr.REQUEST_ID: request_id,
                                                                  Attr.ROUTE_ROLE: role}) as span:
            worker = pick()
            span.set_attribute(Attr.ROUTE_ADDRESS, worker.address)
            return worker

    def _decode_stream(self, worker: WorkerHandle) -> DecodeStreamClient:
        stream = self._decode_streams.get(worker.address)
        if stream is None:
            stream = self._decode_streams[worker.address] = DecodeStreamClient(worker.stub, worker.address)
        return stream

    def close_decode_stream(self, worker: WorkerHandle) -> None:
        """The worker drained and left the cluster (Router.on_worker_closed): its stream goes; a worker at
        that address later gets a stream of its own, on its own channel."""
        stream = self._decode_streams.get(worker.address)
        if stream is not None and stream.stub is worker.stub:
            del self._decode_streams[worker.address]
            stream.close()

    async def _start_decode(self, worker: WorkerHandle, request: worker_pb2.DecodeRequest) -> RequestUpdates:
        try:
            return await self._decode_stream(worker).start(request)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:  # the stream broke as we wrote
            self._router.mark_unhealthy(worker)
            raise WorkerRequestError(grpc.StatusCode.UNAVAILABLE,
                                     f"decode worker {worker.address} is unreachable: {exc}") from None

    async def _relay_updates(self, worker: WorkerHandle, updates: RequestUpdates,
                             time_remaining: Callable[[], float | None]) -> AsyncIterator[TokenEvent | FinishEvent]:
        """One TokenEvent for all the tokens queued since the previous one (a request whose client or
        loop fell behind gets fewer, larger messages), then the FinishEvent."""
        last_token_ids: list[int] = []
        while True:
            try:
                items = await updates.take(time_remaining())
            except asyncio.TimeoutError:
                raise DeadlineExceeded(f"deadline exceeded waiting for decode worker {worker.address}") from None
            token_ids: list[int] = []
            logprobs: list[TokenLogprobs] = []
            end = None  # the update (final) or error that ends the request
            for item in items:
                if type(item) is int:  # a column token: no logprobs, nothing to unwrap
                    token_ids.append(item)
                    continue
                if isinstance(item, WorkerRequestError) or item.WhichOneof("kind") != "tokens":
                    end = item
                    break
                token_ids += item.tokens.token_ids
                if item.tokens.logprobs:
                    logprobs += [logprobs_from_pb(lp) for lp in item.tokens.logprobs]
            if token_ids:
                last_token_ids = token_ids
                yield TokenEvent(token_ids, logprobs or None)
            if end is not None:
                yield self._end_of(worker, updates, end, last_token_ids)
                return

    def _end_of(self, worker: WorkerHandle, updates: RequestUpdates, end, last_token_ids: list[int]) -> FinishEvent:
        """The FinishEvent of a final update; raises the request's error otherwise."""
        if isinstance(end, WorkerRequestError):
            if end.code == grpc.StatusCode.UNAVAILABLE:
                self._router.mark_unhealthy(worker)
            raise end
        kind = end.WhichOneof("kind")
        if kind == "final":
            final = end.final
            stop_id = final.matched_stop_token_id if final.HasField("matched_stop_token_id") else None
            return _finish_event(final.finish_reason, last_token_ids, stop_id)
        if kind == "error":
            raise error_from_pb(end.error)
        raise WorkerStreamError(f"decode worker {worker.address} sent an empty update for {updates.request_id}")

    async def _call(self, worker: WorkerHandle, call):
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            self._note_failure(worker, exc)
            raise

    def _note_failure(self, worker: WorkerHandle, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            self._router.mark_unhealthy(worker)

    def _abort_in_background(self, worker: WorkerHandle, request_id: str) -> asyncio.Task:
        async def abort() -> None:
            try:
                await worker.stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=_ABORT_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as exc:
                logger.warning("Abort %s on %s failed: %s", request_id, worker.address, exc.code().name)

        task = asyncio.get_running_loop().create_task(abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self) -> None:
        """Waits for abort calls still in flight, then closes the decode streams (shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        for stream in self._decode_streams.values():
            stream.close()


def _finish_event(reason_pb: int, last_token_ids: list[int], stop_token_id: int | None = None) -> FinishEvent:
    reason = FINISH_REASON_FROM_PB.get(reason_pb)
    if reason is None:
        raise WorkerStreamError(f"worker sent an unknown finish reason {reason_pb}")
    if reason == "stop" and stop_token_id is None and last_token_ids:
        stop_token_id = last_token_ids[-1]
    return FinishEvent(reason, stop_token_id)


def _resumed(sampling_pb: worker_pb2.SamplingParams, num_output_tokens: int) -> worker_pb2.SamplingParams:
    """The same settings for a request that already generated `num_output_tokens` (seeds, penalties and
    max_tokens then go on from there on the workers)."""
    resumed = worker_pb2.SamplingParams()
    resumed.CopyFrom(sampling_pb)
    resumed.num_output_tokens_before = num_output_tokens
    return resumed


_RUN_SUFFIX_LENGTH = 9  # "@" and 8 hex digits


def worker_request_id(request_id: str) -> str:
    """The id one run of a request has on the workers: the caller's id (cut to leave room) + "@" + 8 random
    hex digits, within the workers' MAX_REQUEST_ID_LENGTH."""
    return f"{request_id[: MAX_REQUEST_ID_LENGTH - _RUN_SUFFIX_LENGTH]}@{secrets.token_hex(4)}"
