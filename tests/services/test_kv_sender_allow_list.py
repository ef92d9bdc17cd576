"""A decode worker given --allowed-kv-senders dials no other address: a Decode call whose KV handle names
another sender fails INVALID_ARGUMENT on `kv_handle.sender_address` before any pull, and the real
prefill offer is left for the request that names an allowed sender."""

import grpc
import pytest

from protos import worker_pb2, worker_pb2_grpc

PROMPT = list(range(100, 121))


def _sampling() -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(max_tokens=4, temperature=0, top_p=1.0, repetition_penalty=1.0, ignore_eos=True)


def _prefill(system, request_id: str) -> worker_pb2.DecodeRequest:
    with grpc.insecure_channel(system.prefill_address) as channel:
        response = worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(
            worker_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=PROMPT, sampling=_sampling()), timeout=30)
    return worker_pb2.DecodeRequest(request_id=request_id, prompt_token_ids=PROMPT, sampling=_sampling(),
                                    first_token_id=response.first_token_id, kv_handle=response.kv_handle)


def _decode(system, request: worker_pb2.DecodeRequest) -> list[worker_pb2.DecodeResponse]:
    with grpc.insecure_channel(system.decode_address) as channel:
        return list(worker_pb2_grpc.DecodeWorkerStub(channel).Decode(request, timeout=30))


@pytest.fixture
def allow_only_the_prefill_worker(system):
    system.decode_worker.allowed_kv_senders = frozenset({system.sender.address})
    yield
    system.decode_worker.allowed_kv_senders = None


def test_a_handle_naming_an_unknown_sender_is_refused_before_any_pull(system, allow_only_the_prefill_worker):
    request = _prefill(system, "allow-list")
    elsewhere = worker_pb2.DecodeRequest()
    elsewhere.CopyFrom(request)
    elsewhere.kv_handle.sender_address = "10.9.9.9:7000"
    with pytest.raises(grpc.RpcError) as info:
        _decode(system, elsewhere)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith("kv_handle.sender_address: '10.9.9.9:7000' is not an allowed KV sender")
    assert system.sender.num_pending == 1  # nothing was pulled: the offer waits for its decode worker
    final = _decode(system, request)[-1]
    assert final.HasField("final") and final.final.num_generated_tokens == 4
    assert system.sender.num_pending == 0
