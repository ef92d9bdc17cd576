"""The OpenAI-compatible HTTP API (FastAPI) over the frontend's one request path.

    GET  /v1/models             the served model            GET /health   200 once ready, else 503
    POST /v1/completions        text / token-id prompts      GET /metrics  Prometheus text
    POST /v1/chat/completions   messages via the chat template

Generation requests are converted to `GenerateRequest`s and run through `FrontendApp.generate`, so
validation, routing, stop strings and aborts are the gRPC API's. Every error answers in OpenAI's body.

Before anything is tokenized: the body is read up to `max_request_bytes` (413 past it), parsed (400 for
JSON nested too deeply, integers beyond Python's digit limit, lone UTF-16 surrogates), `n` is checked
against `max_n`, and one admission slot per choice is taken, all or none (429 with Retry-After).
With `api_key` set every path but /health needs `Authorization: Bearer <key>` (`openai/auth.py`).
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

from services.common.errors import Overloaded
from services.frontend.app import FrontendApp
from services.frontend.openai.auth import OPEN_PATHS, RequireApiKey
from services.frontend.openai.convert import chat_requests, check_model, completion_requests
from services.frontend.openai.errors import OpenAIError, bad_request, from_exception, from_validation_error
from services.frontend.openai.fanout import FanOut
from services.frontend.openai.generation import ClientDisconnected, GenerationCall
from services.frontend.openai.metrics import HttpMetrics
from services.frontend.openai.protocol import ChatCompletionRequest, CompletionRequest
from services.frontend.openai.responses import ResponseBuilder, TokenTexts

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def _read_body(request: Request, max_bytes: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `max_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise OpenAIError(413, f"the request body is {declared} bytes, more than this server accepts ({max_bytes})",
                          code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise OpenAIError(413, f"the request body is more than this server accepts ({max_bytes} bytes)",
                              code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _json_body(request: Request, max_bytes: int) -> dict:
    raw = await _read_body(request, max_bytes)
    try:
        body = json.loads(raw)
    except RecursionError:
        raise bad_request(None, "the request body is not valid JSON: nested too deeply") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(None, f"the request body is not valid JSON: {exc}") from exc
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise bad_request(None, f"the request body holds a value out of range: {exc}") from exc
    if not isinstance(body, dict):
        raise bad_request(None, f"the request body must be a JSON object, got {type(body).__name__}")
    try:  # lone UTF-16 surrogates ("\\udfff") are valid JSON escapes but not Unicode text
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start:exc.end].encode("unicode_escape").decode()
        raise bad_request(None, f"the request body holds a lone UTF-16 surrogate ({bad}), which is not valid "
                                "Unicode text") from None
    except RecursionError:
        raise bad_request(None, "the request body is not valid JSON: nested too deeply") from None
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
        limits = self.frontend.config
        if body.n > limits.max_n:
            raise bad_request("n", f"must be <= {limits.max_n} (this server's limit), got {body.n}")
        choices = chat_requests(body, response_id) if is_chat else completion_requests(body, response_id)
        is_logprobs = body.logprobs if is_chat else body.logprobs is not None
        builder = ResponseBuilder(is_chat, response_id, self.frontend.model_name, int(time.time()),
                                  self.token_texts, [c.prompt_index for c in choices], is_logprobs,
                                  include_usage=body.include_usage)
        slots = self.frontend.admission.take(len(choices))  # all the choices or none: 429 when full
        return GenerationCall(self.frontend, body, choices, builder, FanOut(self.frontend, choices, slots),
                              self.metrics)

    async def _generate(self, request: Request, is_chat: bool) -> Response:
        try:
            call = self._prepare(await _json_body(request, self.frontend.config.max_request_bytes), is_chat)
        except pydantic.ValidationError as exc:
            return from_validation_error(exc).response()
        except OpenAIError as exc:
            return exc.response()
        except Overloaded as exc:
            return from_exception(exc).response()
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
    # No /docs, /redoc or /openapi.json: they would describe the server to anyone who asks.
    api = FastAPI(title="Tandem OpenAI-compatible API", version="1", docs_url=None, redoc_url=None, openapi_url=None)
    api.state.routes = routes
    if frontend.config.api_key is not None:
        api.add_middleware(RequireApiKey, api_key=frontend.config.api_key, open_paths=OPEN_PATHS)
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
