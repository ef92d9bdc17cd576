"""Scaling a running cluster through its discovery file: a decode worker listed in the file gets requests
within 5 s (the default refresh), and one taken out of it drains: the requests it holds finish there, with
migration off, so a request failed or moved off it would fail the test; nothing new goes to it, and its
channel closes once it is idle.

    client ─► frontend ─► prefill ─► decode (static, --decode-addresses)
                                 └─► decode (added: listed in --decode-discovery file:PATH, then removed)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import time

import grpc
import pytest

from protos import generation_pb2 as g
from protos import generation_pb2_grpc
from services.decode.servicer import DecodeServicer
from tests.services.inprocess import assert_idle, extra_decode_worker

ROUTED_WITHIN_SECONDS = 5.0
NUM_HELD_REQUESTS = 4
MAX_TOKENS = 12


class HeldDecode(DecodeServicer):
    """A real decode worker whose DecodeStream messages wait while `hold` is on: its requests stay in
    flight (token #1 from the prefill reached the client) until the test lets them go."""

    def __init__(self):
        super().__init__()
        self.released = asyncio.Event()
        self.released.set()

    async def DecodeStream(self, request_iterator, context):
        async with contextlib.aclosing(super().DecodeStream(request_iterator, context)) as responses:
            async for response in responses:
                await self.released.wait()
                yield response


@pytest.fixture
def scalable(make_system, tmp_path):
    """(system, discovery file, address of a started decode worker not yet listed, its servicer)."""
    listing = tmp_path / "decode-workers"
    listing.write_text("# decode workers found by the frontend\n")
    system = make_system(frontend_overrides={"decode_discovery": f"file:{listing}", "router_mode": "round-robin",
                                             "migration_limit": 0})
    servicer = HeldDecode()
    with extra_decode_worker(system, servicer) as address:
        yield system, listing, address, servicer


def _generate(address: str, prompt: list[int], max_tokens: int = MAX_TOKENS) -> list[int]:
    """The completion's token ids; raises grpc.RpcError on a failed request."""
    request = g.GenerateRequest(token_ids=g.TokenIds(ids=prompt),
                                sampling=g.SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    with grpc.insecure_channel(address) as channel:
        responses = list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60))
    assert responses[-1].HasField("final")
    return [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]


def _handle(system, address: str):
    """The frontend's handle of the worker at `address` (routable or draining), or None."""
    router = system.app.router
    return next((w for w in [*router.decode_workers, *router.retired_workers] if w.address == address), None)


def _wait_for(condition, timeout_seconds: float, what: str) -> float:
    """Seconds until `condition()` held; fails the test past the timeout."""
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_seconds, f"not within {timeout_seconds}s: {what}"
        time.sleep(0.02)
    return time.monotonic() - start


def test_a_listed_worker_gets_requests_within_5s_and_an_unlisted_one_drains_without_a_failure(scalable):
    system, listing, address, servicer = scalable
    assert _handle(system, address) is None

    # scale up: the frontend routes to the new worker within 5 s of the file naming it
    listing.write_text(f"# decode workers found by the frontend\n{address}\n")
    listed_at = time.monotonic()
    while (handle := _handle(system, address)) is None or handle.num_routed == 0:
        assert len(_generate(system.frontend_address, [5, 6, 7, 8])) == MAX_TOKENS
        assert time.monotonic() - listed_at < ROUTED_WITHIN_SECONDS, "the new worker got no request within 5 s"
    added = _handle(system, address)

    # requests held in flight on it (round-robin sends every other one there), then scale down
    system.run(_clear(servicer.released))
    with concurrent.futures.ThreadPoolExecutor(NUM_HELD_REQUESTS) as pool:
        held = [pool.submit(_generate, system.frontend_address, [9, 10, 11 + i]) for i in range(NUM_HELD_REQUESTS)]
        _wait_for(lambda: added.num_inflight_requests >= 2, 10, "requests in flight on the added worker")
        num_routed_before = added.num_routed
        listing.write_text("# scaled down\n")
        _wait_for(lambda: added in system.app.router.retired_workers, ROUTED_WITHIN_SECONDS, "the worker retired")
        assert added.num_inflight_requests >= 2  # still there: draining, not failed
        for i in range(3):  # new requests go to the remaining worker only
            assert len(_generate(system.frontend_address, [20 + i, 21])) == MAX_TOKENS
        assert added.num_routed == num_routed_before
        assert added.channel.get_state() != grpc.ChannelConnectivity.SHUTDOWN
        system.run(_set(servicer.released))
        results = [future.result(timeout=60) for future in held]  # raises on any failed request
    assert [len(token_ids) for token_ids in results] == [MAX_TOKENS] * NUM_HELD_REQUESTS

    # once idle (and the close grace has passed) it leaves the frontend
    _wait_for(lambda: added not in system.app.router.retired_workers, 15, "the drained worker closed")
    assert _handle(system, address) is None
    assert address not in system.app.relay._decode_streams  # its DecodeStream went with it
    assert_idle(system)


async def _clear(event: asyncio.Event) -> None:
    event.clear()


async def _set(event: asyncio.Event) -> None:
    event.set()
