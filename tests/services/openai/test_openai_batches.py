"""The HTTP stream writes what queued while it was behind at once: the FanOut hands over everything
queued as one batch, and each choice's chunks in a batch become one SSE chunk, in order."""

import asyncio
import json

from protos import generation_pb2
from services.frontend.convert import Chunk, Finish
from services.frontend.openai.convert import ChoiceRequest
from services.frontend.openai.fanout import FanOut
from services.frontend.openai.generation import GenerationCall
from services.frontend.openai.metrics import HttpMetrics
from services.frontend.openai.protocol import CompletionRequest
from services.frontend.openai.responses import ResponseBuilder, TokenTexts

TEXTS = {0: ["Hel", "lo", " wor", "ld"], 1: ["日本", "語", "🚀"]}


class _App:
    """Streams each choice's chunks without waiting, as a frontend whose workers are far ahead would."""

    async def generate(self, request: generation_pb2.GenerateRequest, time_remaining):
        index = int(request.request_id)
        for position, text in enumerate(TEXTS[index]):
            yield Chunk([100 * index + position], text)
        yield Finish("length", 3, len(TEXTS[index]))


def _call(app: _App) -> GenerationCall:
    choices = [ChoiceRequest(i, 0, generation_pb2.GenerateRequest(request_id=str(i))) for i in TEXTS]
    body = CompletionRequest.model_validate({"model": "m", "prompt": "x", "stream": True, "n": 2})
    builder = ResponseBuilder(False, "cmpl-1", "m", 0, TokenTexts(None), [0, 0], False)
    return GenerationCall(app, body, choices, builder, FanOut(app, choices), HttpMetrics(None, "m"))


def test_a_consumer_behind_takes_everything_queued_as_one_batch_in_order():
    async def first_batch():
        fanout = FanOut(_App(), [ChoiceRequest(i, 0, generation_pb2.GenerateRequest(request_id=str(i)))
                                 for i in TEXTS])
        batches = fanout.batches()
        fanout.start()
        await asyncio.sleep(0.01)  # the consumer is busy elsewhere while both choices finish
        batch = await anext(batches)
        await batches.aclose()
        return batch

    batch = asyncio.run(first_batch())
    for index, texts in TEXTS.items():
        items = [item for i, item in batch if i == index]
        assert [item.text for item in items[:-1]] == texts and isinstance(items[-1], Finish)


def test_a_batch_becomes_one_sse_chunk_per_choice_then_the_finishes():
    call = _call(_App())
    batch = [(0, Chunk([1], "Hel")), (1, Chunk([2], "日本")), (0, Chunk([3], "lo")), (1, Chunk([4], "語")),
             (0, Finish("length", 3, 2)), (1, Chunk([5], "🚀"))]
    events = [json.loads(line[len("data: "):]) for line in call._feed_batch(batch).split("\n\n") if line]
    texts = [(e["choices"][0]["index"], e["choices"][0]["text"], e["choices"][0]["finish_reason"]) for e in events]
    assert texts == [(0, "Hello", None), (1, "日本語🚀", None), (0, "", "length")]
    assert call.builder.response()["choices"][1]["text"] == "日本語🚀"
