"""gRPC servicer of `tandem.worker.v1.PrefillWorker`: pb <-> domain at the edge, work in PrefillWorker."""

from __future__ import annotations

import grpc

from protos import worker_pb2, worker_pb2_grpc
from services.common.errors import Unavailable
from services.common.worker_messages import (
    FINISH_REASON_TO_PB,
    WorkerStatsData,
    handle_to_pb,
    logprobs_to_pb,
    sampling_from_pb,
    stats_to_pb,
)
from services.prefill.worker import PrefillWorker


class PrefillServicer(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self):
        self.worker: PrefillWorker | None = None  # set once the model is loaded

    def _ready_worker(self) -> PrefillWorker:
        if self.worker is None:
            raise Unavailable("prefill worker is loading its model")
        return self.worker

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        worker = self._ready_worker()
        sampling = sampling_from_pb(request.sampling)
        result = await worker.prefill(request.request_id, list(request.prompt_token_ids), sampling)
        response = worker_pb2.PrefillResponse(
            request_id=request.request_id,
            first_token_id=result.first_token_id,
            finish_reason=FINISH_REASON_TO_PB[result.finish_reason],
        )
        if result.first_logprobs is not None:
            response.first_logprobs.CopyFrom(logprobs_to_pb(result.first_logprobs))
        if result.kv_handle is not None:
            response.kv_handle.CopyFrom(handle_to_pb(result.kv_handle))
        return response

    async def Abort(self, request: worker_pb2.AbortRequest, context: grpc.aio.ServicerContext):
        was_running = await self._ready_worker().abort(request.request_id)
        return worker_pb2.AbortResponse(was_running=was_running)

    async def GetStats(self, request: worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext):
        if self.worker is None:
            return stats_to_pb(WorkerStatsData(role="prefill", is_ready=False))
        return stats_to_pb(self.worker.stats)
