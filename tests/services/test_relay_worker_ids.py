"""Each run of a request has its own id on the workers, so a finished request's background clean-up
Aborts can never stop a new request the caller started under the same id."""

import grpc

from protos import generation_pb2 as g
from protos import generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.common.errors import MAX_REQUEST_ID_LENGTH
from services.frontend.relay import worker_request_id


def test_worker_ids_are_unique_per_run_and_within_the_limit():
    ids = {worker_request_id("chat-1") for _ in range(1000)}
    assert len(ids) == 1000 and all(i.startswith("chat-1@") for i in ids)
    assert len(worker_request_id("x" * MAX_REQUEST_ID_LENGTH)) == MAX_REQUEST_ID_LENGTH


def test_an_abort_for_the_callers_id_on_a_worker_does_not_stop_a_request_under_that_id(make_system):
    system = make_system()
    request = g.GenerateRequest(request_id="reused", token_ids=g.TokenIds(ids=list(range(20, 40))),
                                sampling=g.SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    with grpc.insecure_channel(system.frontend_address) as channel, \
            grpc.insecure_channel(system.decode_address) as decode_channel:
        stream = generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60)
        first = [next(stream), next(stream)]  # token #1 from prefill, then the decode worker's first
        decode = worker_pb2_grpc.DecodeWorkerStub(decode_channel)
        # What a stale clean-up of an earlier "reused" looked like when workers saw the caller's id.
        assert not decode.Abort(worker_pb2.AbortRequest(request_id="reused"), timeout=10).was_running
        rest = list(stream)
    tokens = [t for m in [*first, *rest] if m.WhichOneof("kind") == "chunk" for t in m.chunk.token_ids]
    assert len(tokens) == 24 and rest[-1].final.finish_reason == g.FINISH_REASON_LENGTH
    system.wait_until_idle()
