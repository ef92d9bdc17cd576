"""Mid-stream migration: a decode worker whose DecodeStream dies (UNAVAILABLE) after some tokens moves
its requests: re-prefill of prompt + the tokens already sent, decode on another worker. The caller sees
exactly the undisturbed tokens, once, in order; with migration_limit 0 it sees UNAVAILABLE.

    relay ─► prefill ─► decode A (stand-in over a real worker: its stream dies after NUM_TOKENS_BEFORE_LOSS)
          └─ migration: prefill (prompt + sent tokens) ─► decode B (this system's decode worker)
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import grpc
import pytest

from common.engine.sampling_params import SamplingParams
from protos import worker_pb2, worker_pb2_grpc
from services.decode.servicer import DecodeServicer
from services.frontend.decode_streams import WorkerRequestError
from services.frontend.relay import FinishEvent, Relay, TokenEvent
from services.frontend.router import Router
from tests.services.inprocess import extra_decode_worker

NUM_TOKENS_BEFORE_LOSS = 12  # tokens the lost worker's stream carries (over all its requests) before it dies
REQUESTS = [
    ("greedy-a", [11, 12, 13, 14, 15], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)),
    ("greedy-b", [40, 41, 42], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)),
    ("seeded", [7, 8, 9, 10], SamplingParams(temperature=0.9, seed=3, max_tokens=20, ignore_eos=True,
                                             presence_penalty=0.5)),
]


class LostAfterTokens(DecodeServicer):
    """A real decode worker whose first DecodeStream fails UNAVAILABLE once it has carried `num_tokens`."""

    def __init__(self, num_tokens: int, on_loss):
        super().__init__()
        self.num_tokens = num_tokens
        self.on_loss = on_loss
        self.is_lost = False

    async def DecodeStream(self, request_iterator, context):
        num_sent = 0
        async with contextlib.aclosing(super().DecodeStream(request_iterator, context)) as responses:
            async for response in responses:
                num_sent += len(response.token_ids) + sum(len(update.tokens.token_ids) for update in response.updates)
                if not self.is_lost and num_sent >= self.num_tokens:
                    self.is_lost = True
                    self.on_loss()
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker lost")
                yield response


@pytest.fixture
def lost_worker(make_system):
    """(system, address of the stand-in decode worker, its servicer) on the system's event loop."""
    system = make_system()
    servicer = LostAfterTokens(NUM_TOKENS_BEFORE_LOSS, on_loss=lambda: None)
    with extra_decode_worker(system, servicer) as address:
        yield system, address, servicer


async def _run_all(relay: Relay) -> dict[str, list[int] | grpc.StatusCode]:
    async def one(request_id, prompt, params):
        token_ids = []
        try:
            async for event in relay.run(request_id, prompt, params, lambda: 60.0):
                if isinstance(event, TokenEvent):
                    token_ids += event.token_ids
                else:
                    assert isinstance(event, FinishEvent) and event.finish_reason == "length"
        except WorkerRequestError as error:
            return error.code
        return token_ids

    results = await asyncio.gather(*(one(*request) for request in REQUESTS))
    await relay.drain()
    return {request_id: result for (request_id, _, _), result in zip(REQUESTS, results)}


def _relay(system, decode_addresses: list[str], migration_limit: int) -> tuple[Relay, Router]:
    async def connect() -> Router:  # on the system's loop: grpc.aio channels belong to one loop
        router = Router([system.prefill_address], decode_addresses, refresh_seconds=0.1)
        await router.refresh()
        return router

    router = system.run(connect())
    return Relay(router, migration_limit=migration_limit), router


def _is_idle(address: str, timeout_seconds: float = 10.0) -> bool:
    """Polls a decode worker until every KV block is free and nothing runs or waits."""
    deadline = time.monotonic() + timeout_seconds
    with grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.DecodeWorkerStub(channel)
        while time.monotonic() < deadline:
            stats = stub.GetStats(worker_pb2.GetStatsRequest())
            if stats.num_free_blocks == stats.num_total_blocks and stats.num_running == stats.num_waiting == 0:
                return True
            time.sleep(0.05)
    return False


def test_requests_move_off_a_lost_decode_worker_with_the_undisturbed_tokens(lost_worker):
    system, lost_address, servicer = lost_worker
    relay, router = _relay(system, [system.decode_address], migration_limit=3)
    expected = system.run(_run_all(relay))
    system.run(router.close())

    relay, router = _relay(system, [lost_address, system.decode_address], migration_limit=3)
    healthy = router.decode_workers[1]
    healthy.is_healthy = False  # every request starts on the worker that will be lost ...
    servicer.on_loss = lambda: setattr(healthy, "is_healthy", True)  # ... and the other one is there then
    migrated = system.run(_run_all(relay))
    system.run(router.close())

    assert servicer.is_lost
    for request_id, _, params in REQUESTS:
        assert len(expected[request_id]) == params.max_tokens
        assert migrated[request_id] == expected[request_id], request_id
    assert _is_idle(lost_address)
    prefill, decode = system.wait_until_idle()
    assert prefill.num_held_leases == 0 and prefill.num_free_blocks == prefill.num_total_blocks
    assert decode.num_free_blocks == decode.num_total_blocks


def test_migration_limit_0_sends_unavailable_to_the_caller(lost_worker):
    system, lost_address, servicer = lost_worker
    relay, router = _relay(system, [lost_address, system.decode_address], migration_limit=0)
    router.decode_workers[1].is_healthy = False
    results = system.run(_run_all(relay))
    system.run(router.close())
    assert servicer.is_lost
    assert set(results.values()) == {grpc.StatusCode.UNAVAILABLE}
    prefill, _ = system.wait_until_idle()
    assert _is_idle(lost_address)
    assert prefill.num_held_leases == 0 and prefill.num_free_blocks == prefill.num_total_blocks


@pytest.mark.parametrize("num_before, prompt, max_tokens", [(3, [5, 6, 7], 8), (8, [5, 6, 7, 8, 9, 10, 11, 12, 13], 8),
                                                           (-1, [5, 6, 7], 8)])
def test_workers_refuse_earlier_outputs_that_do_not_fit(make_system, num_before, prompt, max_tokens):
    system = make_system()
    sampling = worker_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, top_p=1.0, repetition_penalty=1.0,
                                         num_output_tokens_before=num_before)
    with grpc.insecure_channel(system.prefill_address) as channel:
        with pytest.raises(grpc.RpcError) as info:
            worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(
                worker_pb2.PrefillRequest(request_id="r", prompt_token_ids=prompt, sampling=sampling), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.num_output_tokens_before" in info.value.details()
