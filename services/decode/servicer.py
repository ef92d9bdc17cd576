"""gRPC servicer of `tandem.worker.v1.DecodeWorker`: pb <-> domain at the edge, work in DecodeWorker."""

from __future__ import annotations

import asyncio

import grpc

from protos import worker_pb2, worker_pb2_grpc
from services.common.engine_thread import AsyncSink
from services.common.errors import InvalidRequest, Unavailable
from services.common.worker_messages import (
    FINISH_REASON_TO_PB,
    WorkerStatsData,
    handle_from_pb,
    logprobs_to_pb,
    sampling_from_pb,
    stats_to_pb,
    transfer_stats_to_pb,
)
from services.decode.worker import DecodeFinal, DecodeJob, DecodeWorker


def _job_from_pb(request: worker_pb2.DecodeRequest, loop: asyncio.AbstractEventLoop) -> DecodeJob:
    if not request.request_id:
        raise InvalidRequest("request_id", "must not be empty")
    if not request.prompt_token_ids:
        raise InvalidRequest("prompt_token_ids", "must not be empty")
    if not request.HasField("kv_handle"):
        raise InvalidRequest("kv_handle", "is required")
    sampling = sampling_from_pb(request.sampling)
    return DecodeJob(
        request_id=request.request_id,
        prompt_token_ids=list(request.prompt_token_ids),
        first_token_id=request.first_token_id,
        sampling=sampling,
        handle=handle_from_pb(request.kv_handle),
        sink=AsyncSink(loop),
    )


def _item_to_pb(item) -> worker_pb2.DecodeResponse:
    if isinstance(item, DecodeFinal):
        final = worker_pb2.DecodeFinal(
            finish_reason=FINISH_REASON_TO_PB[item.finish_reason],
            num_generated_tokens=item.num_generated_tokens,
            transfer=transfer_stats_to_pb(item.transfer),
        )
        if item.matched_stop_token_id is not None:
            final.matched_stop_token_id = item.matched_stop_token_id
        return worker_pb2.DecodeResponse(final=final)
    return worker_pb2.DecodeResponse(
        tokens=worker_pb2.TokenBatch(
            token_ids=item.token_ids, logprobs=[logprobs_to_pb(lp) for lp in item.logprobs or []]
        )
    )


class DecodeServicer(worker_pb2_grpc.DecodeWorkerServicer):
    def __init__(self):
        self.worker: DecodeWorker | None = None  # set once the model is loaded

    def _ready_worker(self) -> DecodeWorker:
        if self.worker is None:
            raise Unavailable("decode worker is loading its model")
        return self.worker

    async def Decode(self, request: worker_pb2.DecodeRequest, context: grpc.aio.ServicerContext):
        worker = self._ready_worker()
        job = _job_from_pb(request, asyncio.get_running_loop())
        async for item in worker.decode(job):
            yield _item_to_pb(item)

    async def Abort(self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext):
        was_running = await self._ready_worker().abort(request.request_id)
        return worker_pb2.AbortResponse(was_running=was_running)

    async def GetStats(self, request: worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext):
        if self.worker is None:
            return stats_to_pb(WorkerStatsData(role="decode", is_ready=False))
        return stats_to_pb(self.worker.stats)
