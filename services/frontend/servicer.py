"""gRPC servicer of the public `tandem.v1.Generation` API: thin, everything lives in `FrontendApp`."""

from __future__ import annotations

import grpc

from protos import generation_pb2, generation_pb2_grpc
from services.frontend.app import FrontendApp
from services.frontend.convert import to_pb


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, app: FrontendApp):
        self._app = app

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        async for response in self._app.generate(request, context.time_remaining, context.invocation_metadata(),
                                                  to_pb):
            yield response

    async def Abort(self, request: generation_pb2.AbortRequest, context: grpc.aio.ServicerContext):
        return generation_pb2.AbortResponse(was_running=self._app.abort(request.request_id))

    async def GetModelInfo(self, request: generation_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        return self._app.model_info()
