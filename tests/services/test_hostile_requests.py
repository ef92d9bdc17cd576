"""No single request can stop a worker's engine: every field of a direct Decode / Prefill call is checked
at the edge (INVALID_ARGUMENT naming the field), and a request whose hand-off into the engine raises
fails alone, its blocks freed, while the others finish."""

import re
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generation_pb2 as g
from protos import generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.services.inprocess import ENGINE_SETTINGS, assert_idle

PROMPT = list(range(100, 121))
VOCAB_SIZE = 49152


def _sampling() -> worker_pb2.SamplingParams:
    return worker_pb2.SamplingParams(max_tokens=8, temperature=0, top_p=1.0, repetition_penalty=1.0, ignore_eos=True)


def _named_field(details: str) -> str:
    """The field an INVALID_ARGUMENT message starts with ("kv_handle.transfer_id: ...", "sampling.top_p must ...")."""
    return re.match(r"[\w.]+", details).group()


def _generate(system, request: g.GenerateRequest) -> list[g.GenerateResponse]:
    with grpc.insecure_channel(system.frontend_address) as channel:
        return list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60))


def _decode_cases(handle: worker_pb2.KVHandle, first_token_id: int) -> dict[str, worker_pb2.DecodeRequest]:
    def request(**changes) -> worker_pb2.DecodeRequest:
        fields = dict(request_id="hostile", prompt_token_ids=PROMPT, first_token_id=first_token_id,
                      sampling=_sampling(), kv_handle=handle)
        fields.update(changes)
        return worker_pb2.DecodeRequest(**{k: v for k, v in fields.items() if v is not None})

    bad_transfer = worker_pb2.KVHandle()
    bad_transfer.CopyFrom(handle)
    bad_transfer.transfer_id = "not-hex"
    return {
        "first_token_id": request(first_token_id=1_000_000),
        "first_token_id ": request(first_token_id=-1),
        "prompt_token_ids": request(prompt_token_ids=[*PROMPT[:-1], VOCAB_SIZE]),
        "prompt_token_ids ": request(prompt_token_ids=[-5, *PROMPT[1:]]),
        "prompt_token_ids  ": request(prompt_token_ids=[3] * ENGINE_SETTINGS["max_model_len"]),
        "prompt_token_ids   ": request(prompt_token_ids=[]),
        "request_id": request(request_id=""),
        "request_id ": request(request_id="x" * 257),
        "request_id  ": request(request_id="bad\nid"),
        "kv_handle": request(kv_handle=None),
        "kv_handle.transfer_id": request(kv_handle=bad_transfer),
        "kv_handle ": request(prompt_token_ids=PROMPT[:-4]),  # the handle holds 21 tokens, not 17
        "sampling.top_p": request(sampling=worker_pb2.SamplingParams(max_tokens=8, top_p=0.0)),
    }


def test_hostile_decode_and_prefill_calls_are_invalid_argument_and_the_workers_go_on(system):
    with grpc.insecure_channel(system.prefill_address) as prefill_channel, \
            grpc.insecure_channel(system.decode_address) as decode_channel:
        prefill = worker_pb2_grpc.PrefillWorkerStub(prefill_channel)
        decode = worker_pb2_grpc.DecodeWorkerStub(decode_channel)
        answer = prefill.Prefill(worker_pb2.PrefillRequest(request_id="hostile", prompt_token_ids=PROMPT,
                                                           sampling=_sampling()), timeout=30)
        for field, request in _decode_cases(answer.kv_handle, answer.first_token_id).items():
            with pytest.raises(grpc.RpcError) as info:
                list(decode.Decode(request, timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, info.value.details())
            assert _named_field(info.value.details()) == field.strip(), (field, info.value.details())
        for field, prompt in [("prompt_token_ids", [1, 2, 10**6]), ("prompt_token_ids", []),
                              ("prompt_token_ids", [3] * ENGINE_SETTINGS["max_model_len"])]:
            with pytest.raises(grpc.RpcError) as info:
                prefill.Prefill(worker_pb2.PrefillRequest(request_id="hostile-p", prompt_token_ids=prompt,
                                                          sampling=_sampling()), timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert _named_field(info.value.details()) == field, info.value.details()
        assert prefill.Abort(worker_pb2.AbortRequest(request_id="hostile"), timeout=10).was_running  # its lease
    assert system.decode_worker.is_alive and system.prefill_worker.is_alive
    responses = _generate(system, g.GenerateRequest(token_ids=g.TokenIds(ids=PROMPT), sampling=g.SamplingParams(
        max_tokens=8, temperature=0, ignore_eos=True)))
    assert responses[-1].final.usage.completion_tokens == 8
    assert_idle(system)


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_request_whose_hand_off_raises_fails_alone_and_frees_its_blocks(make_system, monkeypatch, when):
    system = make_system()
    engine = system.decode_worker.engine
    real_add = engine.add_decode_request

    def add_decode_request(request_id, *args):
        is_poisoned = request_id.split("@")[0] == "poisoned"  # the id of this run on the workers
        if is_poisoned and when == "before":
            raise RuntimeError("injected failure")
        real_add(request_id, *args)
        if is_poisoned:  # the engine already runs it: the worker must take it back out
            raise RuntimeError("injected failure")

    monkeypatch.setattr(engine, "add_decode_request", add_decode_request)
    request_ids = ["ok-0", "ok-1", "poisoned", "ok-2"]
    results: dict[str, object] = {}

    def run(request_id):
        request = g.GenerateRequest(request_id=request_id, token_ids=g.TokenIds(ids=PROMPT),
                                    sampling=g.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
        try:
            results[request_id] = _generate(system, request)
        except grpc.RpcError as error:
            results[request_id] = error

    threads = [threading.Thread(target=run, args=(request_id,)) for request_id in request_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    poisoned = results.pop("poisoned")
    assert isinstance(poisoned, grpc.RpcError) and poisoned.code() == grpc.StatusCode.INTERNAL
    assert "injected failure" in poisoned.details()
    assert all(responses[-1].final.usage.completion_tokens == 10 for responses in results.values())
    assert system.decode_worker.is_alive
    assert_idle(system)
    with grpc.insecure_channel(system.decode_address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    decode_metrics = system.observability["decode"].metrics.registry
    assert decode_metrics.get_sample_value("tandem:request_success_total", {
        "model_name": "tiny", "role": "decode", "finished_reason": "error"}) == 1
