"""Per-request coalescing: what queued for a request while its client (or the loop) was behind goes out
as one message, every token in order; a reader that keeps up gets a message per decode step."""

import asyncio
import time

import grpc
import pytest

from common.engine.sequence import TokenLogprobs
from protos import generation_pb2 as g
from protos import generation_pb2_grpc, worker_pb2
from services.common.worker_messages import logprobs_to_pb
from services.frontend.decode_streams import RequestUpdates, WorkerRequestError
from services.frontend.relay import FinishEvent, Relay, TokenEvent

PROMPT = [5, 17, 300, 41, 9]
MAX_TOKENS = 100


class _Worker:
    address = "decode:0"


class _Router:
    def __init__(self):
        self.unhealthy = []

    def mark_unhealthy(self, worker) -> None:
        self.unhealthy.append(worker)


def _tokens(request_id: str, token_ids: list[int], with_logprobs: bool = False) -> worker_pb2.DecodeUpdate:
    logprobs = [logprobs_to_pb(TokenLogprobs(t, -0.25, [t], [-0.25])) for t in token_ids] if with_logprobs else []
    return worker_pb2.DecodeUpdate(request_id=request_id,
                                   tokens=worker_pb2.TokenBatch(token_ids=token_ids, logprobs=logprobs))


def _final(request_id: str) -> worker_pb2.DecodeUpdate:
    return worker_pb2.DecodeUpdate(request_id=request_id, final=worker_pb2.DecodeFinal(
        finish_reason=worker_pb2.FINISH_REASON_LENGTH, num_generated_tokens=6))


async def _relay_events(queued: list, router=None, arrive_later: list | None = None, pause_seconds: float = 0.0):
    """Events the relay makes of `queued` (already waiting) and `arrive_later` (one per loop turn) while
    its consumer pauses `pause_seconds` after each event."""
    updates = RequestUpdates("r1", {})
    for item in queued:
        updates.queue.put_nowait(item)

    async def arrive() -> None:
        for item in arrive_later or []:
            await asyncio.sleep(0)
            updates.queue.put_nowait(item)

    feeder = asyncio.create_task(arrive())
    relay = Relay(router or _Router())
    events = []
    try:
        async for event in relay._relay_updates(_Worker(), updates, lambda: 5.0):
            events.append(event)
            await asyncio.sleep(pause_seconds)
    finally:
        await feeder
    return events


def test_every_queued_update_of_a_request_becomes_one_event_in_order():
    queued = [_tokens("r1", [t], with_logprobs=True) for t in (11, 12, 13)] + [_tokens("r1", [14, 15]), _final("r1")]
    events = asyncio.run(_relay_events(queued))
    assert len(events) == 2
    tokens, finish = events
    assert isinstance(tokens, TokenEvent) and tokens.token_ids == [11, 12, 13, 14, 15]
    assert [lp.token_id for lp in tokens.logprobs] == [11, 12, 13]  # only the updates that carried them
    assert isinstance(finish, FinishEvent) and finish.finish_reason == "length"


def test_a_consumer_that_keeps_up_gets_an_event_per_update_and_a_slow_one_gets_them_merged():
    later = [_tokens("r1", [t]) for t in range(20, 30)] + [_final("r1")]
    fast = asyncio.run(_relay_events([], arrive_later=later))
    slow = asyncio.run(_relay_events([], arrive_later=later, pause_seconds=0.01))
    for events in (fast, slow):
        assert [t for e in events if isinstance(e, TokenEvent) for t in e.token_ids] == list(range(20, 30))
        assert isinstance(events[-1], FinishEvent)
    assert len(fast) == 11  # one per update, then the finish
    assert len(slow) < len(fast)


def test_tokens_queued_before_an_error_are_relayed_then_the_error_is_raised():
    router = _Router()
    failure = WorkerRequestError(grpc.StatusCode.UNAVAILABLE, "decode stream to decode:0 ended")
    updates = RequestUpdates("r1", {})
    for item in (_tokens("r1", [7]), _tokens("r1", [8]), failure):
        updates.queue.put_nowait(item)

    async def collect():
        events = []
        with pytest.raises(WorkerRequestError) as info:
            async for event in Relay(router)._relay_updates(_Worker(), updates, lambda: 5.0):
                events.append(event)
        return events, info.value

    events, error = asyncio.run(collect())
    assert [e.token_ids for e in events] == [[7, 8]]
    assert error is failure and len(router.unhealthy) == 1  # skipped until its GetStats answers again


def _read(address: str, request: g.GenerateRequest, pause_seconds: float, options=()) -> list[g.GenerateResponse]:
    with grpc.insecure_channel(address, options=list(options)) as channel:
        responses = []
        for response in generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60):
            responses.append(response)
            time.sleep(pause_seconds)
        return responses


def test_a_slow_grpc_reader_gets_fewer_larger_messages_with_every_token_in_order(system):
    request = g.GenerateRequest(token_ids=g.TokenIds(ids=PROMPT), sampling=g.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))
    fast = _read(system.frontend_address, request, 0.0)
    # a small receive window: the frontend's writes wait for this reader, so its tokens queue meanwhile
    slow = _read(system.frontend_address, request, 0.05,
                 [("grpc.http2.lookahead_bytes", 256), ("grpc.http2.bdp_probe", 0)])

    def chunks(responses):
        return [r.chunk for r in responses if r.HasField("chunk") and r.chunk.token_ids]

    assert [t for c in chunks(slow) for t in c.token_ids] == [t for c in chunks(fast) for t in c.token_ids]
    assert "".join(c.text for c in chunks(slow)) == "".join(c.text for c in chunks(fast))
    assert sum(len(c.token_ids) for c in chunks(slow)) == MAX_TOKENS
    assert len(chunks(slow)) < MAX_TOKENS / 3 and max(len(c.token_ids) for c in chunks(slow)) > 5
    assert slow[-1].final.usage.completion_tokens == MAX_TOKENS
