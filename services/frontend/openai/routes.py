"""The OpenAI-compatible HTTP API (FastAPI) over the frontend's one request path.

    GET  /v1/models             the served model            GET /health   200 once ready, else 503
    POST /v1/completions        text / token-id prompts      GET /metrics  Prometheus text
    POST /v1/chat/completions   messages via the chat template

Generation requests are converted to `GenerateRequest`s and run through `FrontendApp.generate`, so
validation, routing, stop strings and aborts are the gRPC API's. Every error answers in OpenAI's body.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.frontend.app import FrontendApp
from services.frontend.openai.convert import chat_requests, check_model, completion_requests
from services.frontend.openai.errors import OpenAIError, bad_request, from_exception, from_validation_error
from services.frontend.openai.fanout import FanOut
from services.frontend.openai.generation import ClientDisconnected, GenerationCall
from services.frontend.openai.metrics import HttpMetrics
from services.frontend.openai.protocol import ChatCompletionRequest, CompletionRequest
from services.frontend.openai.responses import ResponseBuilder, TokenTexts

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(None, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise bad_request(None, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


class OpenAIRoutes:
    """Handlers bound to one frontend; `is_ready()` says whether the frontend finished starting."""

    def __init__(self, frontend: FrontendApp, is_ready: Callable[[], bool]):
        self.frontend = frontend
        self.is_ready = is_ready
        self.created = int(time.time())
        self.token_texts = TokenTexts(frontend.tokenizer)
        self.metrics = HttpMetrics(getattr(frontend, "metrics", None), frontend.model_name)

    async def health(self) -> Response:
        if self.is_ready() and self.frontend.router.is_ready():
            return JSONResponse({"status": "ok"})
        return OpenAIError(503, "not ready: waiting for prefill and decode workers", "service_unavailable_error",
                           code="not_ready").response()

    async def metrics_text(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def _model_card(self) -> dict:
        info = self.frontend.model_info()  # Unavailable (503) until workers answered
        return {"id": info.model_name, "object": "model", "created": self.created, "owned_by": "tandem",
                "root": info.model_name, "max_model_len": info.max_model_len}

    async def list_models(self) -> Response:
        try:
            return JSONResponse({"object": "list", "data": [self._model_card()]})
        except Exception as exc:  # noqa: BLE001
            return from_exception(exc).response()

    async def get_model(self, model: str) -> Response:
        try:
            check_model(model, self.frontend.model_name)
            return JSONResponse(self._model_card())
        except Exception as exc:  # noqa: BLE001
            return from_exception(exc).response()

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, is_chat=False)

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, is_chat=True)

    def _prepare(self, raw: dict, is_chat: bool) -> GenerationCall:
        body = (ChatCompletionRequest if is_chat else CompletionRequest).model_validate(raw)
        check_model(body.model, self.frontend.model_name)
        response_id = f"{'chatcmpl' if is_chat else 'cmpl'}-{uuid.uuid4().hex}"
        choices = chat_requests(body, response_id) if is_chat else completion_requests(body, response_id)
        is_logprobs = body.logprobs if is_chat else body.logprobs is not None
        builder = ResponseBuilder(is_chat, response_id, self.frontend.model_name, int(time.time()),
                                  self.token_texts, [c.prompt_index for c in choices], is_logprobs,
                                  include_usage=body.include_usage)
        return GenerationCall(self.frontend, body, choices, builder, FanOut(self.frontend, choices), self.metrics)

    async def _generate(self, request: Request, is_chat: bool) -> Response:
        try:
            call = self._prepare(await _json_body(request), is_chat)
        except pydantic.ValidationError as exc:
            return from_validation_error(exc).response()
        except OpenAIError as exc:
            return exc.response()
        try:
            if not call.body.stream:
                return JSONResponse(await call.collect(request))
            events = await call.open_stream(request)
        except OpenAIError as exc:
            return exc.response()
        except ClientDisconnected:
            return Response(status_code=499)  # nobody reads it; the request was aborted on the workers
        return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)


def create_app(frontend: FrontendApp, is_ready: Callable[[], bool]) -> FastAPI:
    """The FastAPI app serving `frontend`'s model over OpenAI's HTTP API."""
    routes = OpenAIRoutes(frontend, is_ready)
    api = FastAPI(title="Tandem OpenAI-compatible API", version="1")
    api.state.routes = routes
    api.add_api_route("/health", routes.health, methods=["GET"])
    api.add_api_route("/metrics", routes.metrics_text, methods=["GET"])
    api.add_api_route("/v1/models", routes.list_models, methods=["GET"])
    api.add_api_route("/v1/models/{model:path}", routes.get_model, methods=["GET"])
    api.add_api_route("/v1/completions", routes.completions, methods=["POST"])
    api.add_api_route("/v1/chat/completions", routes.chat_completions, methods=["POST"])

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return OpenAIError(exc.status_code, str(exc.detail), error_type).response()

    return api
