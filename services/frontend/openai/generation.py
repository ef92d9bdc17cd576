"""One /v1/completions or /v1/chat/completions call: fan out, then answer as JSON or as SSE.

    body ─► ChoiceRequest per choice ─► FanOut (app.generate per choice) ─► ResponseBuilder
       non-streamed: collect every choice ─► one JSON body
       streamed:     wait for the first response (errors before it are plain HTTP errors)
                     ─► "data: {chunk}\\n\\n"* [─► usage chunk] ─► "data: [DONE]\\n\\n"

A client that goes away stops the call: the stream's generator is cancelled (Starlette watches the
connection), or, while waiting for the first response or a non-streamed body, `until_disconnected`
notices; either way `FanOut.close()` cancels every choice, which aborts it on the workers.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from starlette.requests import Request

from protos import generation_pb2
from services.frontend.app import FrontendApp
from services.frontend.openai.convert import ChoiceRequest, public_param
from services.frontend.openai.errors import OpenAIError, from_exception
from services.frontend.openai.fanout import ChoiceFailed, FanOut
from services.frontend.openai.metrics import ChoiceClock, HttpMetrics
from services.frontend.openai.protocol import ChatCompletionRequest, CompletionRequest
from services.frontend.openai.responses import FINISH_REASONS, ResponseBuilder
from services.frontend.validation import parse_generate_request

logger = logging.getLogger(__name__)

T = TypeVar("T")


class ClientDisconnected(Exception):
    """The HTTP client closed the connection before the answer was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Awaits `work`, cancelling it (and raising ClientDisconnected) if the client goes away first."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work_task.done():
            return work_task.result()
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        work_task.cancel()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


class GenerationCall:
    def __init__(self, frontend: FrontendApp, body: CompletionRequest | ChatCompletionRequest,
                 choices: list[ChoiceRequest], builder: ResponseBuilder, fanout: FanOut, metrics: HttpMetrics):
        self.frontend = frontend
        self.body = body
        self.choices = choices
        self.builder = builder
        self.fanout = fanout
        self.metrics = metrics
        self._clocks = [ChoiceClock() for _ in choices]
        self._unfinished = set(range(len(choices)))
        self._responses = fanout.responses()

    def error_for(self, exc: BaseException) -> OpenAIError:
        prompt_index = 0
        if isinstance(exc, ChoiceFailed):
            prompt_index, exc = self.choices[exc.index].prompt_index, exc.error
        return from_exception(exc, lambda field: public_param(field, self.body, prompt_index))

    def _feed(self, index: int, response: generation_pb2.GenerateResponse) -> list[dict]:
        if response.HasField("chunk"):
            self.metrics.on_tokens(self._clocks[index], len(response.chunk.token_ids))
            return self.builder.on_chunk(index, response.chunk)
        self._unfinished.discard(index)
        self.metrics.on_finished(self._clocks[index], FINISH_REASONS.get(response.final.finish_reason, "stop"))
        return self.builder.on_final(index, response.final)

    def _end(self, reason: str) -> None:
        """Counts the choices that did not finish (abort or error) and stops them."""
        self.fanout.close()
        for index in self._unfinished:
            self.metrics.on_finished(self._clocks[index], reason)
        self._unfinished.clear()
        self.metrics.request_ended()

    async def collect(self, request: Request) -> dict:
        """The non-streamed body; raises OpenAIError (or ClientDisconnected)."""
        self.metrics.request_started()
        reason = "error"
        try:
            async def run() -> None:
                async for index, response in self._responses:
                    self._feed(index, response)

            await until_disconnected(request, run())
            return self.builder.response()
        except ClientDisconnected:
            reason = "abort"
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to the OpenAI error body
            raise self.error_for(exc) from exc
        finally:
            self._end(reason)

    async def open_stream(self, request: Request) -> AsyncIterator[str]:
        """Waits for the first response, so errors before any output answer with an HTTP status."""
        self.metrics.request_started()
        try:
            if self.body.continuous_usage:
                self.builder.continuous_prompt_tokens = await self._count_prompt_tokens()
            index, response = await until_disconnected(request, anext(self._responses))
        except ClientDisconnected:
            self._end("abort")
            raise
        except Exception as exc:  # noqa: BLE001
            self._end("error")
            raise self.error_for(exc) from exc
        return self._stream(self._feed(index, response))

    async def _count_prompt_tokens(self) -> dict[int, int]:
        """Prompt tokens of each prompt, counted as `FrontendApp.generate` counts them (its own tokenize).

        Only vLLM's continuous_usage_stats needs them before the first token: the Final carries them too.
        """
        vocab_size = self.frontend.router.model_limits().vocab_size
        counts: dict[int, int] = {}
        for choice in self.choices:
            if choice.prompt_index in counts:
                continue
            try:
                parsed = parse_generate_request(choice.request, vocab_size)
                counts[choice.prompt_index] = len(await asyncio.to_thread(self.frontend.tokenize, parsed))
            except Exception as exc:  # noqa: BLE001 - reported like the choice's own failure
                raise ChoiceFailed(choice.index, exc) from exc
        return counts

    async def _stream(self, first_chunks: list[dict]) -> AsyncIterator[str]:
        reason = "abort"
        try:
            for chunk in first_chunks:
                yield _sse(chunk)
            async for index, response in self._responses:
                for chunk in self._feed(index, response):
                    yield _sse(chunk)
            if self.body.include_usage:
                yield _sse(self.builder.usage_chunk())
        except Exception as exc:  # noqa: BLE001 - an error after the first chunk is sent in-band
            reason = "error"
            yield _sse(self.error_for(exc).body())
        finally:
            self._end(reason)
        yield "data: [DONE]\n\n"
