"""The HTTP API's key check (`--api-key`): every path but /health needs `Authorization: Bearer <key>`.

A plain ASGI middleware (no body buffering, streaming untouched) answering 401 in OpenAI's error body.
/metrics needs the key too; the `--metrics-port` server stays open for scrapers.
"""

from __future__ import annotations

from services.frontend.auth import is_authorized
from services.frontend.openai.errors import OpenAIError

OPEN_PATHS = frozenset({"/health"})


class RequireApiKey:
    def __init__(self, app, api_key: str, open_paths: frozenset[str] = OPEN_PATHS):
        self.app = app
        self.api_key = api_key
        self.open_paths = open_paths

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        authorization = next((value for key, value in scope["headers"] if key == b"authorization"), b"")
        try:
            text = authorization.decode("latin-1")
        except UnicodeDecodeError:
            text = ""
        if is_authorized(text, self.api_key):
            await self.app(scope, receive, send)
            return
        error = OpenAIError(401, "missing or wrong API key (Authorization: Bearer <key>)", "authentication_error",
                            code="invalid_api_key")
        response = error.response()
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)
