"""Domain objects -> public generation.proto messages (the frontend's `to_pb` edge)."""

from __future__ import annotations

from dataclasses import dataclass

from common.engine.sequence import TokenLogprobs
from protos import generation_pb2

FINISH_REASON_TO_PB = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
}
FINISH_REASON_NAMES = {value: key for key, value in FINISH_REASON_TO_PB.items()}


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None = None


@dataclass
class Finish:
    finish_reason: str  # "stop" | "length"
    num_prompt_tokens: int
    num_completion_tokens: int
    matched_stop: str | None = None
    matched_stop_token_id: int | None = None


def logprobs_to_pb(logprobs: TokenLogprobs) -> generation_pb2.TokenLogprobs:
    return generation_pb2.TokenLogprobs(
        token_id=logprobs.token_id,
        logprob=logprobs.logprob,
        top=[
            generation_pb2.TopLogprob(token_id=token_id, logprob=logprob)
            for token_id, logprob in zip(logprobs.top_token_ids, logprobs.top_logprobs)
        ],
    )


def chunk_to_pb(request_id: str, chunk: Chunk) -> generation_pb2.GenerateResponse:
    return generation_pb2.GenerateResponse(
        request_id=request_id,
        chunk=generation_pb2.TokenChunk(
            token_ids=chunk.token_ids,
            text=chunk.text,
            logprobs=[logprobs_to_pb(lp) for lp in chunk.logprobs or []],
        ),
    )


def finish_to_pb(request_id: str, finish: Finish) -> generation_pb2.GenerateResponse:
    final = generation_pb2.Final(
        finish_reason=FINISH_REASON_TO_PB[finish.finish_reason],
        usage=generation_pb2.Usage(
            prompt_tokens=finish.num_prompt_tokens, completion_tokens=finish.num_completion_tokens
        ),
    )
    if finish.matched_stop is not None:
        final.matched_stop = finish.matched_stop
    elif finish.matched_stop_token_id is not None:
        final.matched_stop_token_id = finish.matched_stop_token_id
    return generation_pb2.GenerateResponse(request_id=request_id, final=final)
