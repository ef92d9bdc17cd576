"""One /v1/completions or /v1/chat/completions call: fan out, then answer as JSON or as SSE.

    body ─► ChoiceRequest per choice ─► FanOut (app.generate per choice) ─► ResponseBuilder
       non-streamed: collect every choice ─► one JSON body
       streamed:     wait for the first output (errors before it are plain HTTP errors)
                     ─► "data: {chunk}\\n\\n"* [─► usage chunk] ─► "data: [DONE]\\n\\n"

Streamed, each FanOut batch is written at once: a choice's chunks in the batch become one SSE chunk,
and all the batch's SSE chunks one write, so a client or loop that falls behind costs fewer writes.

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

from services.frontend.app import FrontendApp
from services.frontend.convert import Chunk, Finish
from services.frontend.openai.convert import ChoiceRequest, public_param
from services.frontend.openai.errors import OpenAIError, from_exception
from services.frontend.openai.fanout import ChoiceFailed, FanOut
from services.frontend.openai.metrics import ChoiceClock, HttpMetrics
from services.frontend.openai.protocol import ChatCompletionRequest, CompletionRequest
from services.frontend.openai.responses import ResponseBuilder
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
        self._batches = fanout.batches()

    def error_for(self, exc: BaseException) -> OpenAIError:
        prompt_index = 0
        if isinstance(exc, ChoiceFailed):
            prompt_index, exc = self.choices[exc.index].prompt_index, exc.error
        return from_exception(exc, lambda field: public_param(field, self.body, prompt_index))

    def _feed(self, index: int, item: Chunk | Finish) -> list[dict]:
        if type(item) is Chunk:
            self.metrics.on_tokens(self._clocks[index], len(item.token_ids))
            return self.builder.on_chunk(index, item)
        self._unfinished.discard(index)
        self.metrics.on_finished(self._clocks[index], item.finish_reason)
        return self.builder.on_final(index, item)

    def _feed_batch(self, batch: list[tuple[int, Chunk | Finish]]) -> str:
        """The SSE text of one batch: each choice's consecutive chunks merged into one."""
        merged: list[tuple[int, Chunk | Finish]] = []
        open_chunk: dict[int, int] = {}  # choice index -> position in `merged` of its chunk still open
        for index, item in batch:
            position = open_chunk.get(index)
            if type(item) is Chunk and position is not None:
                merged[position] = (index, merged[position][1].merged(item))
                continue
            if type(item) is Chunk:
                open_chunk[index] = len(merged)
            else:
                open_chunk.pop(index, None)
            merged.append((index, item))
        return "".join(_sse(chunk) for index, item in merged for chunk in self._feed(index, item))

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
                async for batch in self._batches:
                    for index, item in batch:
                        self._feed(index, item)

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
            first_batch = await until_disconnected(request, anext(self._batches))
        except ClientDisconnected:
            self._end("abort")
            raise
        except Exception as exc:  # noqa: BLE001
            self._end("error")
            raise self.error_for(exc) from exc
        return self._stream(self._feed_batch(first_batch))

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
                counts[choice.prompt_index] = len(await self.frontend.prompt_token_ids(parsed))
            except Exception as exc:  # noqa: BLE001 - reported like the choice's own failure
                raise ChoiceFailed(choice.index, exc) from exc
        return counts

    async def _stream(self, first_events: str) -> AsyncIterator[str]:
        reason = "abort"
        try:
            if first_events:
                yield first_events
            async for batch in self._batches:
                events = self._feed_batch(batch)
                if events:
                    yield events
            if self.body.include_usage:
                yield _sse(self.builder.usage_chunk())
        except Exception as exc:  # noqa: BLE001 - an error after the first chunk is sent in-band
            reason = "error"
            yield _sse(self.error_for(exc).body())
        finally:
            self._end(reason)
        yield "data: [DONE]\n\n"
