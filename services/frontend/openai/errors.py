"""Errors in OpenAI's body, `{"error": {"message", "type", "param", "code"}}`, with HTTP statuses.

Exceptions are mapped through the same table the gRPC servers use (`services.common.errors.status_for`),
then gRPC status -> HTTP status:

    INVALID_ARGUMENT -> 400    NOT_FOUND -> 404    RESOURCE_EXHAUSTED -> 429
    UNAVAILABLE -> 503         DEADLINE_EXCEEDED -> 504    CANCELLED (Abort) and anything else -> 500

A frontend `InvalidRequest` names a GenerateRequest field (`sampling.temperature`, `chat.messages[1].role`);
`public_param` turns that into the OpenAI parameter the client sent (`temperature`, `messages[1].role`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
import pydantic
from fastapi.responses import JSONResponse

from services.common.errors import InvalidRequest, status_for
from services.frontend.admission import RETRY_AFTER_SECONDS

logger = logging.getLogger(__name__)

_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout_error"),
    grpc.StatusCode.CANCELLED: (500, "cancelled_error"),  # stopped by the gRPC Abort RPC
}
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "dict"}  # pydantic's union-member tags in `loc`


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param
        self.code = code
        self.retry_after_seconds: int | None = None  # sent as Retry-After (429: the server is full)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after_seconds)} if self.retry_after_seconds is not None else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad_request(param: str | None, problem: str) -> OpenAIError:
    message = f"{param}: {problem}" if param else problem
    return OpenAIError(400, message, param=param, code="invalid_value")


def model_not_found(model: str) -> OpenAIError:
    return OpenAIError(404, f"model: the model {model!r} does not exist", "not_found_error", "model",
                       "model_not_found")


def from_exception(exc: BaseException, public_param: Callable[[str], str | None] = lambda name: name) -> OpenAIError:
    """Any exception of the request path -> OpenAIError (bugs are logged and become 500)."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, InvalidRequest):
        problem = str(exc)[len(exc.field) + 2:] if str(exc).startswith(f"{exc.field}: ") else str(exc)
        return bad_request(public_param(exc.field), problem)
    code, message = status_for(exc)
    status, error_type = _HTTP_STATUS.get(code, (500, "internal_error"))
    if code not in _HTTP_STATUS:
        logger.error("OpenAI API request failed (%s)", code.name, exc_info=exc)
    error = OpenAIError(status, message, error_type, code=code.name.lower())
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        error.retry_after_seconds = getattr(exc, "retry_after_seconds", RETRY_AFTER_SECONDS)
    return error


def _loc_to_param(loc: tuple) -> tuple[str, int]:
    """pydantic's error location -> ("messages[0].content", depth), skipping union-member tags."""
    parts = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        elif str(item).isidentifier() and item not in _TYPE_NAMES:
            parts.append(f".{item}" if parts else item)
    return "".join(parts), len(parts)


def from_validation_error(exc: pydantic.ValidationError) -> OpenAIError:
    """The most specific problem pydantic found (the deepest location), naming its parameter."""
    errors = exc.errors(include_url=False)
    located = [(*_loc_to_param(e["loc"]), e) for e in errors]
    depth = max(d for _, d, _ in located)
    param, _, first = next(item for item in located if item[1] == depth)
    if first["type"] == "extra_forbidden":
        return bad_request(param, "unrecognized request argument (not supported by this server)")
    message = first["msg"].removeprefix("Value error, ")
    if not param:  # a model-level check: its message starts with "param: "
        param, _, problem = message.partition(": ")
        return bad_request(param, problem)
    problems = [e["msg"] for p, _, e in located if p == param]
    return bad_request(param, " or ".join(dict.fromkeys(problems)))
