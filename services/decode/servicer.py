"""gRPC servicer of `tandem.worker.v1.DecodeWorker`: pb <-> domain at the edge, work in DecodeWorker.

Every DecodeRequest field is checked here (INVALID_ARGUMENT naming the field), so nothing malformed
reaches the engine thread: the port is reachable by any client, not only by our frontend.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc

from protos import worker_pb2, worker_pb2_grpc
from services.common.errors import InvalidRequest, Unavailable, check_prompt, check_request_id, check_token_ids
from services.common.worker_messages import (
    FINISH_REASON_TO_PB,
    WorkerStatsData,
    handle_from_pb,
    logprobs_to_pb,
    sampling_from_pb,
    stats_to_pb,
    transfer_stats_to_pb,
)
from services.decode.jobs import DecodeFinal, DecodeJob, TokenBatch, coalesce
from services.decode.stream import DecodeStreamSession
from services.decode.worker import DecodeWorker


def job_from_pb(request: worker_pb2.DecodeRequest, vocab_size: int, max_model_len: int) -> DecodeJob:
    """A DecodeJob from a request whose every field was checked; raises InvalidRequest naming the field."""
    check_request_id(request.request_id)
    check_prompt("prompt_token_ids", request.prompt_token_ids, vocab_size, max_model_len)  # length first
    prompt_token_ids = list(request.prompt_token_ids)
    if request.prefill_here:
        return _prefill_here_job(request, prompt_token_ids)
    check_token_ids("first_token_id", [request.first_token_id], vocab_size)
    if not request.HasField("kv_handle"):
        raise InvalidRequest("kv_handle", "is required (or set prefill_here)")
    handle = handle_from_pb(request.kv_handle)  # ValueError "kv_handle.<field>: ..."
    return DecodeJob(
        request_id=request.request_id,
        prompt_token_ids=prompt_token_ids,
        first_token_id=request.first_token_id,
        sampling=sampling_from_pb(request.sampling, len(prompt_token_ids)),  # ValueError "sampling.<field>: ..."
        handle=handle,
    )


def _prefill_here_job(request: worker_pb2.DecodeRequest, prompt_token_ids: list[int]) -> DecodeJob:
    """A request this worker prefills itself: nothing of a hand-off may come with it."""
    if request.HasField("kv_handle"):
        raise InvalidRequest("kv_handle", "must be absent with prefill_here (the worker computes the prompt)")
    if request.first_token_id != 0:
        raise InvalidRequest("first_token_id", f"must be 0 with prefill_here (the worker samples token #1), "
                                               f"got {request.first_token_id}")
    return DecodeJob(
        request_id=request.request_id,
        prompt_token_ids=prompt_token_ids,
        first_token_id=None,
        sampling=sampling_from_pb(request.sampling, len(prompt_token_ids)),  # ValueError "sampling.<field>: ..."
        handle=None,
        num_generated_tokens=0,
        is_prefill_here=True,
    )


def item_to_pb(item: TokenBatch | DecodeFinal) -> worker_pb2.TokenBatch | worker_pb2.DecodeFinal:
    if isinstance(item, DecodeFinal):
        final = worker_pb2.DecodeFinal(
            finish_reason=FINISH_REASON_TO_PB[item.finish_reason],
            num_generated_tokens=item.num_generated_tokens,
            transfer=transfer_stats_to_pb(item.transfer),
        )
        if item.matched_stop_token_id is not None:
            final.matched_stop_token_id = item.matched_stop_token_id
        return final
    return worker_pb2.TokenBatch(token_ids=item.token_ids, logprobs=[logprobs_to_pb(lp) for lp in item.logprobs or []])


def _item_to_pb(item) -> worker_pb2.DecodeResponse:
    if isinstance(item, DecodeFinal):
        return worker_pb2.DecodeResponse(final=item_to_pb(item))
    return worker_pb2.DecodeResponse(tokens=item_to_pb(item))


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self):
        self.worker: DecodeWorker | None = None  # set once the model is loaded

    def _ready_worker(self) -> DecodeWorker:
        if self.worker is None:
            raise Unavailable("decode worker is loading its model")
        if not self.worker.is_alive:
            raise Unavailable("decode worker's engine has stopped")
        return self.worker

    async def Decode(self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        arrived_at = time.monotonic()
        worker = self._ready_worker()
        job = job_from_pb(request, worker.vocab_size, worker.max_model_len)
        job.enqueued_at = arrived_at
        # Each turn takes everything queued since the last write: one message per step while the writer
        # keeps up, one merged TokenBatch (then the final) when it fell behind. Closing the stream early
        # (cancelled call) closes worker.decode at once, which frees the request.
        async with contextlib.aclosing(worker.decode(job)) as stream:
            async for items in stream:
                for item in coalesce(items):
                    yield _item_to_pb(item)

    async def DecodeStream(self, request_iterator, context: grpc.aio.ServicerContext):
        worker = self._ready_worker()
        session = DecodeStreamSession(
            worker, lambda request: job_from_pb(request, worker.vocab_size, worker.max_model_len), item_to_pb)
        reader = asyncio.ensure_future(session.read_requests(request_iterator))
        try:
            async for response in session.responses():
                yield response
        finally:
            reader.cancel()
            session.close()

    async def Abort(self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext):
        was_running = await self._ready_worker().abort(request.request_id)
        return worker_pb2.AbortResponse(was_running=was_running)

    async def GetStats(self, request: worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext):
        if self.worker is None or not self.worker.is_alive:
            return stats_to_pb(WorkerStatsData(role="decode", is_ready=False))
        return stats_to_pb(self.worker.stats)
