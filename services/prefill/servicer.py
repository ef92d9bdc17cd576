"""gRPC servicer of `tandem.worker.v1.PrefillWorker`: pb <-> domain at the edge, work in PrefillWorker.

Every PrefillRequest field is checked here (INVALID_ARGUMENT naming the field) before the engine thread
sees it.
"""

from __future__ import annotations

import grpc

from protos import worker_pb2, worker_pb2_grpc
from services.common.errors import Unavailable, check_prompt, check_request_id
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
        if not self.worker.is_alive:
            raise Unavailable("prefill worker's engine has stopped")
        return self.worker

    async def Prefill(self, request: worker_pb2.PrefillRequest, context: grpc.aio.ServicerContext):
        worker = self._ready_worker()
        check_request_id(request.request_id)
        check_prompt("prompt_token_ids", request.prompt_token_ids, worker.vocab_size, worker.max_model_len)
        prompt_token_ids = list(request.prompt_token_ids)
        sampling = sampling_from_pb(request.sampling, len(prompt_token_ids))  # ValueError "sampling.<field>: ..."
        result = await worker.prefill(request.request_id, prompt_token_ids, sampling)
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
        if self.worker is None or not self.worker.is_alive:
            return stats_to_pb(WorkerStatsData(role="prefill", is_ready=False))
        return stats_to_pb(self.worker.stats)
