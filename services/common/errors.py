"""The one exception -> gRPC status mapping every Tandem server uses.

Handlers raise plain exceptions; `StatusInterceptor` turns them into statuses at the edge:

    bad input (InvalidRequest, ValueError)      -> INVALID_ARGUMENT  (message names the field)
    unknown id / transfer (NotFound, ...)       -> NOT_FOUND
    full queues / no KV blocks (Overloaded)     -> RESOURCE_EXHAUSTED
    draining, no worker (Unavailable)           -> UNAVAILABLE
    KV layout mismatch                          -> FAILED_PRECONDITION (message names the field)
    KV transfer lost (connection, timeout)      -> UNAVAILABLE / DEADLINE_EXCEEDED
    an error status from a downstream call      -> the same status and message
    anything else (a bug)                       -> INTERNAL, logged with the request id

The workers' servicers check every request field at the edge with the `check_*` helpers below, so
nothing malformed reaches an engine thread.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import grpc

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base of the errors that carry their own status code."""

    code = grpc.StatusCode.INTERNAL


class InvalidRequest(ServiceError, ValueError):
    """Bad input; the message starts with the offending field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str):
        super().__init__(f"{field}: {problem}")
        self.field = field


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class Overloaded(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(ServiceError):
    """The request was stopped by Abort."""

    code = grpc.StatusCode.CANCELLED


class DeadlineExceeded(ServiceError):
    """The request's deadline passed while it waited on a worker."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


# Longest request id a service accepts (the frontend's limit for client-chosen ids too).
MAX_REQUEST_ID_LENGTH = 256


def check_request_id(request_id: str) -> None:
    """1..MAX_REQUEST_ID_LENGTH printable characters (no control characters: ids end up in logs)."""
    if not request_id:
        raise InvalidRequest("request_id", "must not be empty")
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidRequest("request_id", f"at most {MAX_REQUEST_ID_LENGTH} characters, got {len(request_id)}")
    if not request_id.isprintable():
        raise InvalidRequest("request_id", "must be printable characters only")


def check_token_ids(field: str, token_ids, vocab_size: int) -> None:
    """Every id in [0, vocab_size) (min/max run in C: cheap for long prompts)."""
    if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab_size):
        bad = next(t for t in token_ids if not 0 <= t < vocab_size)
        raise InvalidRequest(field, f"token id {bad} is outside [0, {vocab_size})")


def check_prompt(field: str, token_ids, vocab_size: int, max_model_len: int) -> None:
    """Non-empty, shorter than max_model_len (room for one output token), every id in the vocabulary."""
    if not token_ids:
        raise InvalidRequest(field, "must not be empty")
    if len(token_ids) >= max_model_len:
        raise InvalidRequest(field, f"has {len(token_ids)} tokens; max_model_len {max_model_len} leaves no room "
                                    f"for output")
    check_token_ids(field, token_ids, vocab_size)


def _typed_status_table() -> list[tuple[type[BaseException], grpc.StatusCode]]:
    """Engine and transfer exceptions (imported late: the frontend never loads the engine)."""
    from common.kv import OutOfKVBlocks
    from common.transfer import (
        KVInvalidPull,
        KVLayoutMismatch,
        KVSizeMismatch,
        KVTransferError,
        KVTransferNotFound,
        KVTransferTimeout,
    )

    return [  # most specific first
        (OutOfKVBlocks, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (KVLayoutMismatch, grpc.StatusCode.FAILED_PRECONDITION),
        (KVSizeMismatch, grpc.StatusCode.FAILED_PRECONDITION),
        (KVInvalidPull, grpc.StatusCode.INVALID_ARGUMENT),
        (KVTransferNotFound, grpc.StatusCode.NOT_FOUND),
        (KVTransferTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
        (KVTransferError, grpc.StatusCode.UNAVAILABLE),  # connection refused / lost: retryable
    ]


_TYPED_STATUS: list[tuple[type[BaseException], grpc.StatusCode]] | None = None


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message a client should see for `exc`."""
    global _TYPED_STATUS
    if isinstance(exc, ServiceError):
        return exc.code, str(exc)
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code(), exc.details() or exc.code().name
    if _TYPED_STATUS is None:
        _TYPED_STATUS = _typed_status_table()
    for exc_type, code in _TYPED_STATUS:
        if isinstance(exc, exc_type):
            return code, str(exc)
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


async def _abort_with(context: grpc.aio.ServicerContext, exc: Exception, request: Any, method: str):
    code, message = status_for(exc)
    request_id = getattr(request, "request_id", "") or "-"
    if code == grpc.StatusCode.INTERNAL:
        logger.error("%s request_id=%s failed", method, request_id, exc_info=exc)
    else:
        logger.info("%s request_id=%s -> %s: %s", method, request_id, code.name, message)
    if context.done():  # the call already ended (its deadline passed, the client left): no status to send
        return
    try:
        await context.abort(code, message)
    except grpc.aio.AbortError:
        raise
    except Exception:  # noqa: BLE001 - the call ended while the status was on its way: nobody to tell
        if not context.done():
            raise


def _wrap_unary(behavior, method: str):
    async def wrapped(request, context):
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the mapping point
            await _abort_with(context, exc, request, method)

    return wrapped


def _wrap_stream(behavior, method: str):
    async def wrapped(request, context):
        try:
            async for response in behavior(request, context):
                yield response
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the mapping point
            await _abort_with(context, exc, request, method)

    return wrapped


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions of Tandem's own RPCs (`/tandem.*`) to statuses; other services pass through."""

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/tandem."):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
