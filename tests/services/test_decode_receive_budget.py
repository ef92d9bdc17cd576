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


class _Gate:
    """Stands in for a CUDA event recorded after the receive buffer's allocation: not complete until opened."""

    def __init__(self):
        self.is_open = False

    def query(self) -> bool:
        return self.is_open


def _gated_buffers(worker) -> list[_Gate]:
    from common.kv.kv_pool import TransferBuffer

    gates: list[_Gate] = []
    allocate = worker.engine.kv_pool.new_transfer_buffer

    def gated(num_blocks):
        gates.append(_Gate())
        return TransferBuffer(allocate(num_blocks).tensor, gates[-1])

    worker.engine.kv_pool.new_transfer_buffer = gated
    return gates


def _wait_for(condition, timeout: float = 30.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_pull_starts_only_once_its_buffer_is_ready_and_an_abort_before_that_frees_everything(make_system):
    system = make_system()
    worker = system.decode_worker
    gates = _gated_buffers(worker)
    begun = _pulls_in_flight_at_each_begin(system)
    request = g.GenerateRequest(token_ids=g.TokenIds(ids=list(range(100, 140))),
                                sampling=g.SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    with grpc.insecure_channel(system.frontend_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        waiting = stub.Generate(request, timeout=60)
        next(waiting)  # token #1 came from the prefill worker; the hand-off waits for its buffer
        _wait_for(lambda: len(gates) == 1)
        assert begun == []  # no bytes may land while queued kernels could still use that memory
        waiting.cancel()  # abandoned before its pull ever started
        assert_idle(system)
        assert begun == []

        finishing = stub.Generate(request, timeout=60)
        _wait_for(lambda: len(gates) == 2)
        assert begun == []
        gates[1].is_open = True
        responses = list(finishing)
    assert responses[-1].final.usage.completion_tokens == 5 and len(begun) == 1
    assert_idle(system)
