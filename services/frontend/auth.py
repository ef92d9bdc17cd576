"""The frontend's API key (`--api-key`, vLLM's flag): `Authorization: Bearer <key>` on HTTP, metadata
`authorization: Bearer <key>` on gRPC. Keys are compared in constant time."""

from __future__ import annotations

import hmac

import grpc

from services.common.errors import ServiceError


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


def is_authorized(authorization: str | bytes | None, api_key: str | None) -> bool:
    """Whether an `authorization` value carries `api_key` (always True when no key is set)."""
    if api_key is None:
        return True
    if isinstance(authorization, bytes):
        return False
    scheme, _, given = (authorization or "").partition(" ")
    is_bearer = scheme.lower() == "bearer"
    return hmac.compare_digest(given.strip().encode(), api_key.encode()) and is_bearer


def check_grpc_key(context: grpc.aio.ServicerContext, api_key: str | None) -> None:
    """Raises Unauthenticated unless the call's metadata carries `authorization: Bearer <api_key>`."""
    if api_key is None:
        return
    authorization = next((value for key, value in context.invocation_metadata() or () if key == "authorization"), None)
    if not is_authorized(authorization, api_key):
        raise Unauthenticated("missing or wrong API key (metadata authorization: Bearer <key>)")
