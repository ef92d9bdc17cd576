"""The frontend's DecodeStream writer: requests started while a write is in flight go out together as
one `decodes` message; a failed write fails exactly the requests it and later writes would carry."""

import asyncio

import grpc
import pytest

from protos import worker_pb2
from services.frontend.decode_streams import DecodeStreamClient, WorkerRequestError


class HeldCall:
    """A stand-in DecodeStream call: records writes, each held until released; yields no responses."""

    def __init__(self, fail_writes: bool = False):
        self.messages: list[worker_pb2.DecodeStreamRequest] = []
        self.release = asyncio.Event()
        self.fail_writes = fail_writes
        self._closed = asyncio.Event()

    async def write(self, message):
        await self.release.wait()
        if self.fail_writes:
            raise grpc.aio.UsageError("the call is done")
        self.messages.append(message)

    def done(self) -> bool:
        return self._closed.is_set()

    def cancel(self) -> None:
        self._closed.set()

    def __aiter__(self):
        return self._responses()

    async def _responses(self):
        await self._closed.wait()
        return
        yield


class Stub:
    def __init__(self, *calls):
        self.calls = list(calls)
        self.opened = []

    def DecodeStream(self):  # noqa: N802 - the gRPC method name
        call = self.calls.pop(0)
        self.opened.append(call)
        return call


def request(request_id: str) -> worker_pb2.DecodeRequest:
    return worker_pb2.DecodeRequest(request_id=request_id, prompt_token_ids=[1, 2, 3])


def ids_of(message: worker_pb2.DecodeStreamRequest) -> list[str]:
    kind = message.WhichOneof("kind")
    return [message.decode.request_id] if kind == "decode" else [r.request_id for r in message.decodes.requests]


def test_requests_started_during_a_write_go_out_as_one_message():
    async def scenario():
        call = HeldCall()
        client = DecodeStreamClient(Stub(call), "decode:1")
        await client.start(request("r0"))
        await asyncio.sleep(0)  # the writer takes r0 and waits on its write
        for i in range(1, 6):
            await client.start(request(f"r{i}"))
        call.release.set()
        for _ in range(20):
            await asyncio.sleep(0)
        client.close()
        return call.messages

    messages = asyncio.run(scenario())
    assert [m.WhichOneof("kind") for m in messages] == ["decode", "decodes"]
    assert [ids_of(m) for m in messages] == [["r0"], ["r1", "r2", "r3", "r4", "r5"]]


def test_a_failed_write_fails_its_requests_and_the_next_request_opens_a_new_stream():
    async def scenario():
        broken, fresh = HeldCall(fail_writes=True), HeldCall()
        stub = Stub(broken, fresh)
        client = DecodeStreamClient(stub, "decode:1")
        first = [await client.start(request(f"r{i}")) for i in range(3)]
        broken.release.set()
        errors = [(await updates.take(5.0))[-1] for updates in first]
        later = await client.start(request("r9"))
        fresh.release.set()
        for _ in range(20):
            await asyncio.sleep(0)
        client.close()
        return errors, stub.opened, fresh.messages, later

    errors, opened, fresh_messages, later = asyncio.run(scenario())
    assert all(isinstance(e, WorkerRequestError) and e.code == grpc.StatusCode.UNAVAILABLE for e in errors)
    assert len(opened) == 2
    assert [ids_of(m) for m in fresh_messages] == [["r9"]]
    assert later.request_id == "r9"


def test_a_live_id_is_refused_at_once():
    async def scenario():
        call = HeldCall()
        client = DecodeStreamClient(Stub(call), "decode:1")
        await client.start(request("r0"))
        with pytest.raises(WorkerRequestError) as info:
            await client.start(request("r0"))
        call.release.set()
        await asyncio.sleep(0)
        client.close()
        return info.value

    error = asyncio.run(scenario())
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "already in use" in str(error)
