"""Domain objects -> public generation.proto messages (the frontend's `to_pb` edge)."""

from __future__ import annotations

from dataclasses import dataclass

from common.engine.sequence import TokenLogprobs
from protos import generation_pb2

FINISH_REASON_TO_PB = {
    "stop": generation_pb2.FINISH_REASON_STOP,
    "length": generation_pb2.FINISH_REASON_LENGTH,
}


@dataclass
class Chunk:
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprobs] | None = None

    def merged(self, later: Chunk) -> Chunk:
        """This chunk followed by `later`, as one chunk."""
        logprobs = (self.logprobs or []) + (later.logprobs or []) if self.logprobs or later.logprobs else None
        return Chunk(self.token_ids + later.token_ids, self.text + later.text, logprobs)


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
    response = generation_pb2.GenerateResponse(request_id=request_id)
    pb = response.chunk
    pb.token_ids.extend(chunk.token_ids)
    pb.text = chunk.text
    if chunk.logprobs:
        pb.logprobs.extend([logprobs_to_pb(lp) for lp in chunk.logprobs])
    return response


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


def to_pb(request_id: str, item: Chunk | Finish) -> generation_pb2.GenerateResponse:
    """One GenerateResponse for a Chunk or the Finish."""
    return chunk_to_pb(request_id, item) if type(item) is Chunk else finish_to_pb(request_id, item)
