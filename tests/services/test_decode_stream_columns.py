"""DecodeStream's token columns: new tokens without logprobs travel as two parallel arrays of the
message, everything else as DecodeUpdates. The worker's session plays against a fake engine here, its
messages go through bytes to the frontend's DecodeStreamClient (on a fake call) and the relay, so each
test checks the layout the worker builds and what a request's caller gets out of it."""

import asyncio
import concurrent.futures
from types import SimpleNamespace

import grpc
import pytest
from opentelemetry import trace

from common.engine.sequence import TokenLogprobs
from protos import worker_pb2
from services.common.engine_thread import Mailbox
from services.common.errors import Overloaded
from services.decode.jobs import DecodeFinal, TokenBatch
from services.decode.servicer import item_to_pb
from services.decode.stream import DecodeStreamSession
from services.frontend.decode_streams import DecodeStreamClient, WorkerRequestError
from services.frontend.relay import FinishEvent, Relay, TokenEvent


class _FakeWorker:
    """What a DecodeStreamSession uses of a DecodeWorker; the test plays the engine through `sinks`."""

    is_alive = True

    def __init__(self):
        self.obs = SimpleNamespace(tracing=SimpleNamespace(tracer=trace.NoOpTracer()))
        self.thread = SimpleNamespace(mailbox=Mailbox())
        self.sinks = {}  # by request id

    def submit(self, job, sink) -> concurrent.futures.Future:
        self.sinks[job.request_id] = sink
        enqueued = concurrent.futures.Future()
        enqueued.set_result(None)
        return enqueued

    def cancel(self, job) -> None:
        pass


class _FakeCall:
    """The frontend's DecodeStream call; the test hands it the worker's messages (as bytes, as gRPC would)."""

    def __init__(self):
        self._messages: asyncio.Queue = asyncio.Queue()
        self.is_cancelled = False

    async def write(self, message) -> None:
        pass

    def done(self) -> bool:
        return self.is_cancelled

    def cancel(self) -> None:
        self.is_cancelled = True
        self._messages.put_nowait(None)

    def receive(self, message: worker_pb2.DecodeStreamResponse) -> None:
        self._messages.put_nowait(worker_pb2.DecodeStreamResponse.FromString(message.SerializeToString()))

    def __aiter__(self):
        return self._read()

    async def _read(self):
        while (message := await self._messages.get()) is not None:
            yield message


class _Stream:
    """One DecodeStream from the worker's session to the frontend's client, a step at a time."""

    def __init__(self):
        self.worker = _FakeWorker()
        self.session = DecodeStreamSession(self.worker, lambda request: SimpleNamespace(
            request_id=request.request_id), item_to_pb)
        self._responses = self.session.responses()
        self.call = _FakeCall()
        self.client = DecodeStreamClient(SimpleNamespace(DecodeStream=lambda: self.call), "decode:0")
        self.updates = {}  # the frontend's RequestUpdates, by request id

    async def start(self, request_ids: list[str]) -> None:
        async def requests():
            for request_id in request_ids:
                yield worker_pb2.DecodeStreamRequest(decode=worker_pb2.DecodeRequest(request_id=request_id))

        await self.session.read_requests(requests())
        for request_id in request_ids:
            self.updates[request_id] = await self.client.start(worker_pb2.DecodeRequest(request_id=request_id))

    async def step(self, *steps: list[tuple]) -> worker_pb2.DecodeStreamResponse:
        """Each step's (request_id, item) in engine order; returns the one message the worker sends for
        them, after the frontend got it."""
        for items in steps:
            for request_id, item in items:
                self.worker.sinks[request_id].put(item)
            self.worker.thread.mailbox.flush()
        await asyncio.sleep(0)  # the flushed calls run on this loop
        message = await asyncio.wait_for(self._responses.__anext__(), 5)
        self.call.receive(message)
        await asyncio.sleep(0)  # the client's reader takes it
        return message

    async def events(self, request_id: str) -> list:
        """What the relay makes of everything queued for `request_id`; its error is the last item."""
        events = []
        try:
            async for event in Relay(_Router())._relay_updates(_Worker(), self.updates[request_id], lambda: 5.0):
                events.append(event)
        except WorkerRequestError as error:
            events.append(error)
        return events


class _Worker:
    address = "decode:0"


class _Router:
    def mark_unhealthy(self, worker) -> None:
        pass


def _logprobs(token_id: int) -> list[TokenLogprobs]:
    return [TokenLogprobs(token_id, -0.5, [token_id, 3], [-0.5, -1.5])]


def _final(reason: str = "length", stop_token_id: int | None = None) -> DecodeFinal:
    return DecodeFinal(reason, 9, None, stop_token_id)


def _kinds(message: worker_pb2.DecodeStreamResponse) -> list[tuple[str, str]]:
    return [(update.request_id, update.WhichOneof("kind")) for update in message.updates]


def _token_ids(events) -> list[int]:
    return [t for event in events if isinstance(event, TokenEvent) for t in event.token_ids]


def test_tokens_and_the_final_of_one_step_arrive_tokens_first():
    async def scenario():
        stream = _Stream()
        await stream.start(["a"])
        first = await stream.step([("a", TokenBatch([11], None))])
        last = await stream.step([("a", TokenBatch([12], None)), ("a", _final("stop", 12))])
        return first, last, await stream.events("a")

    first, last, events = asyncio.run(scenario())
    assert list(first.token_request_ids) == ["a"] and list(first.token_ids) == [11] and not first.updates
    assert list(last.token_request_ids) == ["a"] and list(last.token_ids) == [12]
    assert _kinds(last) == [("a", "final")]  # the last token is a column entry, read before the final
    assert _token_ids(events) == [11, 12]
    assert events[-1] == FinishEvent("stop", 12)


def test_a_step_of_512_requests_is_one_message_of_columns():
    request_ids = [f"request-{i}" for i in range(512)]

    async def scenario():
        stream = _Stream()
        await stream.start(request_ids)
        message = await stream.step([(rid, TokenBatch([1000 + i], None)) for i, rid in enumerate(request_ids)])
        taken = {rid: await stream.updates[rid].take(1.0) for rid in request_ids}
        return message, taken

    message, taken = asyncio.run(scenario())
    assert list(message.token_request_ids) == request_ids
    assert list(message.token_ids) == [1000 + i for i in range(512)]
    assert not message.updates
    assert all(taken[rid] == [1000 + i] for i, rid in enumerate(request_ids))


def test_steps_queued_behind_the_writer_list_a_request_once_per_token_in_order():
    async def scenario():
        stream = _Stream()
        await stream.start(["a", "b"])
        message = await stream.step([("a", TokenBatch([1], None)), ("b", TokenBatch([5], None))],
                                    [("a", TokenBatch([2], None)), ("b", TokenBatch([6, 7], None))],
                                    [("a", TokenBatch([3], None)), ("b", _final())])
        await stream.step([("a", _final())])
        return message, await stream.events("a"), await stream.events("b")

    message, events_a, events_b = asyncio.run(scenario())
    assert list(message.token_request_ids) == ["a", "b", "a", "b", "b", "a"]
    assert list(message.token_ids) == [1, 5, 2, 6, 7, 3]
    assert _kinds(message) == [("b", "final")]
    assert events_a == [TokenEvent([1, 2, 3], None), FinishEvent("length")]
    assert events_b == [TokenEvent([5, 6, 7], None), FinishEvent("length")]


def test_requests_with_and_without_logprobs_share_a_message():
    async def scenario():
        stream = _Stream()
        await stream.start(["plain", "with-logprobs"])
        messages = [await stream.step([("plain", TokenBatch([t], None)), ("with-logprobs", TokenBatch([t + 1],
                                                                                                      _logprobs(t + 1)))])
                    for t in (20, 30)]
        messages.append(await stream.step([("plain", _final()), ("with-logprobs", _final())]))
        return messages, await stream.events("plain"), await stream.events("with-logprobs")

    messages, plain, with_logprobs = asyncio.run(scenario())
    for message, token_id in zip(messages, (20, 30)):
        assert list(message.token_request_ids) == ["plain"] and list(message.token_ids) == [token_id]
        (update,) = message.updates
        assert update.request_id == "with-logprobs" and list(update.tokens.token_ids) == [token_id + 1]
        assert [lp.token_id for lp in update.tokens.logprobs] == [token_id + 1]
    assert _token_ids(plain) == [20, 30] and all(e.logprobs is None for e in plain[:-1])
    assert _token_ids(with_logprobs) == [21, 31]
    assert [lp.token_id for e in with_logprobs[:-1] for lp in e.logprobs] == [21, 31]
    assert plain[-1] == with_logprobs[-1] == FinishEvent("length")


def test_tokens_after_a_request_s_update_in_the_same_message_stay_behind_it():
    """Columns are read first: a token that follows one of its request's DecodeUpdates in the same
    message must be a DecodeUpdate too, or it would overtake it."""
    async def scenario():
        stream = _Stream()
        await stream.start(["r"])
        message = await stream.step([("r", TokenBatch([1], None)), ("r", TokenBatch([2], _logprobs(2)))],
                                    [("r", TokenBatch([3], None)), ("r", _final())])
        return message, await stream.events("r")

    message, events = asyncio.run(scenario())
    assert list(message.token_request_ids) == ["r"] and list(message.token_ids) == [1]
    assert _kinds(message) == [("r", "tokens"), ("r", "tokens"), ("r", "final")]
    assert [list(u.tokens.token_ids) for u in message.updates[:2]] == [[2], [3]]
    assert _token_ids(events) == [1, 2, 3] and events[-1] == FinishEvent("length")


def test_an_error_follows_the_request_s_tokens_and_nothing_comes_after_it():
    async def scenario():
        stream = _Stream()
        await stream.start(["failing", "healthy"])
        failed = await stream.step([("failing", TokenBatch([7], None)), ("healthy", TokenBatch([40], None)),
                                    ("failing", Overloaded("out of blocks"))])
        after = await stream.step([("failing", TokenBatch([8], None)), ("healthy", TokenBatch([41], None))])
        await stream.step([("healthy", _final())])
        return failed, after, await stream.events("failing"), await stream.events("healthy")

    failed, after, failing, healthy = asyncio.run(scenario())
    assert list(failed.token_request_ids) == ["failing", "healthy"] and list(failed.token_ids) == [7, 40]
    assert _kinds(failed) == [("failing", "error")]
    assert failed.updates[0].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert list(after.token_request_ids) == ["healthy"]  # the ended request's late token is dropped
    assert failing[0] == TokenEvent([7], None)
    error = failing[-1]
    assert isinstance(error, WorkerRequestError) and error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _token_ids(healthy) == [40, 41] and healthy[-1] == FinishEvent("length")


def test_a_message_with_uneven_columns_fails_every_request_on_the_stream():
    async def scenario():
        stream = _Stream()
        await stream.start(["a", "b"])
        stream.call.receive(worker_pb2.DecodeStreamResponse(token_request_ids=["a", "b"], token_ids=[1]))
        return stream, await stream.updates["a"].take(1.0), await stream.updates["b"].take(1.0)

    stream, taken_a, taken_b = asyncio.run(scenario())
    for taken in (taken_a, taken_b):
        (error,) = taken
        assert isinstance(error, WorkerRequestError) and error.code == grpc.StatusCode.INTERNAL
        assert "1 column token ids for 2 request ids" in str(error)
    assert stream.call.is_cancelled


@pytest.mark.parametrize("num_tokens", [1, 3])
def test_the_columns_carry_a_batch_of_any_size(num_tokens):
    async def scenario():
        stream = _Stream()
        await stream.start(["r"])
        message = await stream.step([("r", TokenBatch(list(range(num_tokens)), None)), ("r", _final())])
        return message, await stream.events("r")

    message, events = asyncio.run(scenario())
    assert list(message.token_request_ids) == ["r"] * num_tokens
    assert _token_ids(events) == list(range(num_tokens))
