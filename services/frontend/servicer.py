"""gRPC servicer of the public `tandem.v1.Generation` API: thin, everything lives in `FrontendApp`.

Register it with `add_generation_servicer` (not the generated function): its request deserializers
never raise, so a corrupt message or invalid UTF-8 in a string field reaches the handler as an
`Undecodable` and is refused with INVALID_ARGUMENT, instead of failing inside gRPC as UNKNOWN.

Caller identity: a Generate belongs to the connection it arrived on (`context.peer()`), and `Abort`
only reaches requests of the same connection. Request ids stay client-chosen and unique server-wide.

With an API key (`--api-key`), Generate, Abort and GetModelInfo need metadata
`authorization: Bearer <key>` (UNAUTHENTICATED otherwise); health and reflection stay open.
"""

from __future__ import annotations

import grpc

from protos import generation_pb2, generation_pb2_grpc
from services.common.errors import InvalidRequest, Overloaded
from services.common.tolerant_decoding import Undecodable, add_tolerant_servicer, service_descriptor
from services.frontend.admission import RETRY_AFTER_SECONDS
from services.frontend.app import FrontendApp
from services.frontend.auth import check_grpc_key
from services.frontend.convert import to_pb

SERVICE_NAME = "tandem.v1.Generation"


def _check_decoded(request) -> None:
    if isinstance(request, Undecodable):
        raise InvalidRequest("request", request.description)


def caller_of(context: grpc.aio.ServicerContext) -> str:
    """The caller a request belongs to: its connection (peer address and port)."""
    return f"grpc:{context.peer()}"


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, app: FrontendApp):
        self._app = app

    async def Generate(self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        check_grpc_key(context, self._app.config.api_key)
        _check_decoded(request)
        try:
            async for response in self._app.generate(request, context.time_remaining, context.invocation_metadata(),
                                                      to_pb, caller_of(context)):
                yield response
        except Overloaded:
            context.set_trailing_metadata((("retry-after", str(RETRY_AFTER_SECONDS)),
                                           ("grpc-retry-pushback-ms", str(RETRY_AFTER_SECONDS * 1000))))
            raise

    async def Abort(self, request: generation_pb2.AbortRequest, context: grpc.aio.ServicerContext):
        check_grpc_key(context, self._app.config.api_key)
        _check_decoded(request)
        return generation_pb2.AbortResponse(was_running=self._app.abort(request.request_id, caller_of(context)))

    async def GetModelInfo(self, request: generation_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        check_grpc_key(context, self._app.config.api_key)
        _check_decoded(request)
        return self._app.model_info()


def add_generation_servicer(servicer: GenerationServicer, server: grpc.aio.Server) -> None:
    """Registers `servicer` like the generated `add_GenerationServicer_to_server`, with tolerant decoding
    (each method checks the API key, then refuses an `Undecodable`)."""
    add_tolerant_servicer(servicer, server, service_descriptor(SERVICE_NAME), refuses_undecodable=False)
