"""One request's trip through the workers, as a stream of domain events.

    pick workers -> Prefill (unary) -> TokenEvent(token #1)  [sent before any KV moves]
                 -> Decode (stream)  -> TokenEvent(...)* -> FinishEvent

Each pick is a `route` span (which worker, of which kind), a sibling of the RPC span that follows it.

Whatever ends the stream early (a stop string, client cancel, deadline, Abort, an error) closes the
generator; its `finally` cancels the Decode call and sends Abort to both workers, so every block on
every worker is freed. The aborts run as background tasks: they must not be cancelled with the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import grpc

from common import tracing
from common.engine.sampling_params import SamplingParams
from common.engine.sequence import TokenLogprobs
from common.tracing import Attr, SpanName
from protos import worker_pb2
from services.common.errors import ServiceError
from services.common.worker_messages import FINISH_REASON_FROM_PB, logprobs_from_pb, sampling_to_pb
from services.frontend.router import Router, WorkerHandle

logger = logging.getLogger(__name__)

_ABORT_TIMEOUT_SECONDS = 5.0


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
    def __init__(self, router: Router, tracing_handle: tracing.TracingHandle | None = None):
        self._router = router
        self._tracing = tracing_handle or tracing.init_tracing("frontend", "")
        self._background: set[asyncio.Task] = set()  # abort calls in flight (kept referenced)

    async def run(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        time_remaining: Callable[[], float | None],
    ) -> AsyncIterator[TokenEvent | FinishEvent]:
        """Yields token #1 (from Prefill), the decoded tokens, then one FinishEvent."""
        prefill = self._route(request_id, "prefill", self._router.pick_prefill)
        sampling_pb = sampling_to_pb(sampling)
        touched: list[WorkerHandle] = []  # workers that may hold state for this request
        decode_call = None
        is_finished = False
        try:
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
                is_finished = True
                yield _finish_event(response.finish_reason, [response.first_token_id])
                return
            # picked now: its load is known best after the prefill
            decode = self._route(request_id, "decode", self._router.pick_decode)
            touched.append(decode)
            with self._router.track(decode):
                decode_call = decode.stub.Decode(
                    worker_pb2.DecodeRequest(
                        request_id=request_id,
                        prompt_token_ids=prompt_token_ids,
                        first_token_id=response.first_token_id,
                        sampling=sampling_pb,
                        kv_handle=response.kv_handle,
                    ),
                    timeout=time_remaining(),
                )
                async for event in self._relay_decode(decode, decode_call):
                    is_finished = isinstance(event, FinishEvent)
                    yield event
                    if is_finished:
                        return
            raise WorkerStreamError(f"decode worker {decode.address} ended the stream without a final message")
        finally:
            if not is_finished:
                if decode_call is not None:
                    decode_call.cancel()
                for worker in touched:
                    self._abort_in_background(worker, request_id)

    def _route(self, request_id: str, role: str, pick: Callable[[], WorkerHandle]) -> WorkerHandle:
        """One worker pick as a `route` span (ERROR when no worker of that kind is ready)."""
        with self._tracing.start_span(SpanName.ROUTE, attributes={Attr.REQUEST_ID: request_id,
                                                                  Attr.ROUTE_ROLE: role}) as span:
            worker = pick()
            span.set_attribute(Attr.ROUTE_ADDRESS, worker.address)
            return worker

    async def _relay_decode(self, worker: WorkerHandle, call) -> AsyncIterator[TokenEvent | FinishEvent]:
        last_token_ids: list[int] = []
        try:
            async for message in call:
                if message.HasField("tokens"):
                    batch = message.tokens
                    last_token_ids = list(batch.token_ids)
                    logprobs = [logprobs_from_pb(lp) for lp in batch.logprobs] or None
                    yield TokenEvent(last_token_ids, logprobs)
                else:
                    final = message.final
                    stop_id = final.matched_stop_token_id if final.HasField("matched_stop_token_id") else None
                    async for _ in call:  # the status follows at once; reading it ends the call (and its span)
                        pass
                    yield _finish_event(final.finish_reason, last_token_ids, stop_id)
                    return
        except grpc.aio.AioRpcError as exc:
            self._note_failure(worker, exc)
            raise

    async def _call(self, worker: WorkerHandle, call):
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            self._note_failure(worker, exc)
            raise

    def _note_failure(self, worker: WorkerHandle, exc: grpc.aio.AioRpcError) -> None:
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            self._router.mark_unhealthy(worker)

    def _abort_in_background(self, worker: WorkerHandle, request_id: str) -> None:
        async def abort() -> None:
            try:
                await worker.stub.Abort(worker_pb2.AbortRequest(request_id=request_id), timeout=_ABORT_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as exc:
                logger.warning("Abort %s on %s failed: %s", request_id, worker.address, exc.code().name)

        task = asyncio.get_running_loop().create_task(abort())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Waits for abort calls still in flight (shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


def _finish_event(reason_pb: int, last_token_ids: list[int], stop_token_id: int | None = None) -> FinishEvent:
    reason = FINISH_REASON_FROM_PB.get(reason_pb)
    if reason is None:
        raise WorkerStreamError(f"worker sent an unknown finish reason {reason_pb}")
    if reason == "stop" and stop_token_id is None and last_token_ids:
        stop_token_id = last_token_ids[-1]
    return FinishEvent(reason, stop_token_id)
