"""Servicer registration that answers INVALID_ARGUMENT to a request whose bytes do not decode.

The generated `add_*Servicer_to_server` functions decode with `Message.FromString`, which raises on a
corrupt message or a string field that is not UTF-8; gRPC then answers UNKNOWN and logs a traceback.
`add_tolerant_servicer` registers the same methods (read from the service's descriptor) with a decoder
that turns such bytes into an `Undecodable`, which the method's wrapper answers with INVALID_ARGUMENT
before the servicer sees it (for a client stream: when that message is reached).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import DecodeError


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes are not a valid message of `message_name`."""

    message_name: str
    problem: str

    @property
    def description(self) -> str:
        return f"not a valid {self.message_name} ({self.problem}; string fields must be UTF-8)"


def tolerant_deserializer(message_class):
    def deserialize(data: bytes):
        try:
            return message_class.FromString(data)
        except DecodeError as exc:  # corrupt wire format, or a string field that is not UTF-8
            return Undecodable(message_class.DESCRIPTOR.name, str(exc))

    return deserialize


def service_descriptor(full_name: str):
    """The descriptor of a service whose generated module is imported, e.g. "tandem.worker.v1.DecodeWorker"."""
    return descriptor_pool.Default().FindServiceByName(full_name)


def add_tolerant_servicer(servicer: Any, server: grpc.aio.Server, service_descriptor, *,
                          refuses_undecodable: bool = True) -> None:
    """Registers every method of `service_descriptor` (see `service_descriptor()`) on `servicer`, as the
    generated function would, with tolerant decoding. `refuses_undecodable=False`: the methods get the
    `Undecodable` themselves (to check something else first, such as an API key)."""
    handlers = {}
    for method in service_descriptor.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        behaviour = getattr(servicer, method.name)
        kind = (method.client_streaming, method.server_streaming)
        wrapped = behaviour if not refuses_undecodable else {
            (False, False): _unary_unary, (False, True): _unary_stream,
            (True, False): _stream_unary, (True, True): _stream_stream}[kind](behaviour)
        make_handler = {(False, False): grpc.unary_unary_rpc_method_handler,
                        (False, True): grpc.unary_stream_rpc_method_handler,
                        (True, False): grpc.stream_unary_rpc_method_handler,
                        (True, True): grpc.stream_stream_rpc_method_handler}[kind]
        handlers[method.name] = make_handler(wrapped, request_deserializer=tolerant_deserializer(request_class),
                                             response_serializer=response_class.SerializeToString)
    name = service_descriptor.full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)


async def _refuse(request: Undecodable, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request: {request.description}")


def _unary_unary(behaviour):
    @functools.wraps(behaviour)
    async def handle(request, context):
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        return await behaviour(request, context)

    return handle


def _unary_stream(behaviour):
    @functools.wraps(behaviour)
    async def handle(request, context):
        if isinstance(request, Undecodable):
            await _refuse(request, context)
        async for response in behaviour(request, context):
            yield response

    return handle


def _checked_requests(requests, context):
    async def checked():
        async for request in requests:
            if isinstance(request, Undecodable):
                await _refuse(request, context)
            yield request

    return checked()


def _stream_unary(behaviour):
    @functools.wraps(behaviour)
    async def handle(requests, context):
        return await behaviour(_checked_requests(requests, context), context)

    return handle


def _stream_stream(behaviour):
    @functools.wraps(behaviour)
    async def handle(requests, context):
        async for response in behaviour(_checked_requests(requests, context), context):
            yield response

    return handle
