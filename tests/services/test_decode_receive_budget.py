"""The decode worker bounds the KV bytes it pulls at once: receive buffers live outside the KV pool's
memory budget, so hand-offs past `max_receiving_bytes` wait their turn (one always runs) and all finish."""

import concurrent.futures
import gc
import weakref

import grpc

from protos import generation_pb2 as g
from protos import generation_pb2_grpc
from services.decode.worker import DecodeLimits
from tests.services.inprocess import assert_idle


def _pulls_in_flight_at_each_begin(system) -> list[int]:
    worker = system.decode_worker
    seen: list[int] = []
    begin = worker.receiver.begin

    def counting_begin(*args, **kwargs):
        seen.append(len(worker._receiving))
        return begin(*args, **kwargs)

    worker.receiver.begin = counting_begin
    return seen


def _generate_many(system, num_requests: int) -> list[int]:
    def one(index: int) -> int:
        request = g.GenerateRequest(token_ids=g.TokenIds(ids=[100 + index] * (20 + index)),
                                    sampling=g.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))
        with grpc.insecure_channel(system.frontend_address) as channel:
            responses = list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60))
        return responses[-1].final.usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(num_requests) as pool:
        return list(pool.map(one, range(num_requests)))


def test_pulls_past_the_byte_budget_wait_their_turn(make_system):
    system = make_system(decode_limits=DecodeLimits(max_receiving_bytes=1))
    seen = _pulls_in_flight_at_each_begin(system)
    assert _generate_many(system, 6) == [6] * 6
    assert len(seen) == 6 and max(seen) == 0  # one pull at a time
    assert_idle(system)



def test_a_running_request_keeps_no_receive_buffer(make_system):
    system = make_system()
    worker = system.decode_worker
    destinations = []
    begin = worker.receiver.begin

    def recording_begin(handle, destination, *args, **kwargs):
        destinations.append(weakref.ref(destination))
        return begin(handle, destination, *args, **kwargs)

    worker.receiver.begin = recording_begin
    request = g.GenerateRequest(token_ids=g.TokenIds(ids=list(range(100, 140))),
                                sampling=g.SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    with grpc.insecure_channel(system.frontend_address) as channel:
        stream = generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60)
        for _ in range(4):  # decoding: the KV is in the pool, the buffer it arrived in is no longer needed
            next(stream)
        gc.collect()
        assert len(destinations) == 1 and destinations[0]() is None
        stream.cancel()
    assert_idle(system)
