"""The request path through real gRPC servers in one process (tiny model, fake KV transfer).

Checks what the frontend promises: tokens equal a single engine's, stop strings, finish reasons,
usage, logprobs, and every worker's KV pool back to zero after each request, however it ended.
"""

import threading
import time

import grpc
import pytest

from common.engine.sampling_params import SamplingParams
from protos import generation_pb2 as g
from protos import generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.services.inprocess import ENGINE_SETTINGS, assert_idle, single_engine_tokens

PROMPTS = [[5, 17, 300, 41, 9], [1000, 2000, 3000], list(range(50, 71)), [7] * 9]


@pytest.fixture(scope="module")
def stub(system):
    with grpc.insecure_channel(system.frontend_address) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def _generate(stub, request: g.GenerateRequest, **kwargs):
    responses = list(stub.Generate(request, **kwargs))
    token_ids = [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]
    text = "".join(r.chunk.text for r in responses if r.HasField("chunk"))
    assert responses[-1].HasField("final") and sum(r.HasField("final") for r in responses) == 1
    return token_ids, text, responses[-1].final, responses


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.0),
    dict(temperature=0.9, top_p=0.9, top_k=50, seed=123, repetition_penalty=1.1),
])
def test_concurrent_requests_match_one_engine(system, stub, tiny_folder, tiny_model, sampling):
    params = SamplingParams(max_tokens=12, ignore_eos=True, **sampling)
    expected = single_engine_tokens(tiny_folder, tiny_model, PROMPTS, params)
    results = [None] * len(PROMPTS)

    def run(index):
        request = g.GenerateRequest(token_ids=g.TokenIds(ids=PROMPTS[index]),
                                    sampling=g.SamplingParams(max_tokens=12, ignore_eos=True, **sampling))
        results[index] = _generate(stub, request)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for index, (token_ids, _, final, _) in enumerate(results):
        assert token_ids == expected[index]
        assert final.finish_reason == g.FINISH_REASON_LENGTH
        assert final.usage.prompt_tokens == len(PROMPTS[index]) and final.usage.completion_tokens == 12
    assert_idle(system)


def test_text_matches_the_tokenizer_and_logprobs_come_per_token(system, stub, tokenizer):
    request = g.GenerateRequest(text="Hello there, how are you?",
                                sampling=g.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True, logprobs=2))
    token_ids, text, final, responses = _generate(stub, request)
    assert text == tokenizer.decode(token_ids, skip_special_tokens=True)
    logprobs = [lp for r in responses if r.HasField("chunk") for lp in r.chunk.logprobs]
    assert [lp.token_id for lp in logprobs] == token_ids
    for lp in logprobs:  # greedy: the sampled token is the most likely one
        assert len(lp.top) == 2 and lp.top[0].token_id == lp.token_id and lp.top[0].logprob >= lp.top[1].logprob
    assert final.usage.prompt_tokens == len(tokenizer("Hello there, how are you?")["input_ids"])


def test_stop_string_is_cut_and_the_workers_stop(system, stub, tokenizer):
    base = g.GenerateRequest(token_ids=g.TokenIds(ids=PROMPTS[2]),
                             sampling=g.SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    _, full_text, _, _ = _generate(stub, base)
    stop = full_text[len(full_text) // 2: len(full_text) // 2 + 3]
    assert stop.strip(), full_text
    request = g.GenerateRequest()
    request.CopyFrom(base)
    request.sampling.stop.append(stop)
    token_ids, text, final, _ = _generate(stub, request)
    assert text == full_text[: full_text.index(stop)]
    assert final.finish_reason == g.FINISH_REASON_STOP and final.matched_stop == stop
    assert final.usage.completion_tokens == len(token_ids) < 30
    assert_idle(system)


def test_first_token_can_end_the_request_without_any_transfer(system, stub):
    _, decode_before = system.worker_stats()
    token_ids, _, final, _ = _generate(stub, g.GenerateRequest(
        token_ids=g.TokenIds(ids=PROMPTS[0]), sampling=g.SamplingParams(max_tokens=1, temperature=0)))
    assert len(token_ids) == 1 and final.finish_reason == g.FINISH_REASON_LENGTH
    _, decode_after = system.worker_stats()
    assert decode_after.num_transfers == decode_before.num_transfers
    assert_idle(system)


def test_eos_as_stop_token_ends_with_stop(system, stub):
    first, _, _, _ = _generate(stub, g.GenerateRequest(
        token_ids=g.TokenIds(ids=PROMPTS[1]), sampling=g.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)))
    stop_token = first[3]
    token_ids, _, final, _ = _generate(stub, g.GenerateRequest(
        token_ids=g.TokenIds(ids=PROMPTS[1]),
        sampling=g.SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, stop_token_ids=[stop_token])))
    assert token_ids == first[: first.index(stop_token) + 1]
    assert final.finish_reason == g.FINISH_REASON_STOP and final.matched_stop_token_id == stop_token


def test_abort_cancels_the_stream_and_frees_every_block(system, stub):
    request = g.GenerateRequest(request_id="to-abort", token_ids=g.TokenIds(ids=PROMPTS[2]),
                                sampling=g.SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    stream = stub.Generate(request)
    next(stream)  # token #1 arrived: the request is on the workers
    assert stub.Abort(g.AbortRequest(request_id="to-abort")).was_running
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert not stub.Abort(g.AbortRequest(request_id="to-abort")).was_running
    assert_idle(system)


def test_client_cancel_and_deadline_free_every_block(system, stub):
    long_request = g.GenerateRequest(token_ids=g.TokenIds(ids=PROMPTS[3]),
                                     sampling=g.SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    stream = stub.Generate(long_request)
    next(stream)
    stream.cancel()
    assert_idle(system)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(long_request, timeout=0.1))  # well inside the ~0.4 s the request takes here
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_idle(system)


def test_bad_requests_name_the_field_and_the_service_stays_healthy(system, stub):
    cases = {
        "text": g.GenerateRequest(text=""),
        "sampling.temperature": g.GenerateRequest(text="hi", sampling=g.SamplingParams(temperature=-1)),
        "sampling.top_p": g.GenerateRequest(text="hi", sampling=g.SamplingParams(top_p=1.5)),
        "sampling.max_tokens": g.GenerateRequest(text="hi", sampling=g.SamplingParams(max_tokens=0)),
        "token_ids": g.GenerateRequest(token_ids=g.TokenIds(ids=[3] * ENGINE_SETTINGS["max_model_len"])),
    }
    for field, request in cases.items():
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith(field), info.value.details()
    info = stub.GetModelInfo(g.GetModelInfoRequest())
    assert info.max_model_len == ENGINE_SETTINGS["max_model_len"] and info.vocab_size == 49152
    assert list(info.eos_token_ids) == [2] and info.has_chat_template


def test_worker_errors_map_to_status_codes(system):
    with grpc.insecure_channel(system.decode_address) as channel:
        decode = worker_pb2_grpc.DecodeWorkerStub(channel)
        with pytest.raises(grpc.RpcError) as info:  # a handle that names no offer
            list(decode.Decode(worker_pb2.DecodeRequest(request_id="x", prompt_token_ids=[1, 2, 3]), timeout=5))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "kv_handle" in info.value.details()
        assert not decode.Abort(worker_pb2.AbortRequest(request_id="never-seen")).was_running
    with grpc.insecure_channel(system.prefill_address) as channel:
        prefill = worker_pb2_grpc.PrefillWorkerStub(channel)
        bad = worker_pb2.PrefillRequest(request_id="y", prompt_token_ids=[1, 2],
                                        sampling=worker_pb2.SamplingParams(max_tokens=4, top_p=0.0))
        with pytest.raises(grpc.RpcError) as info:
            prefill.Prefill(bad, timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in info.value.details()


def test_a_handle_never_pulled_is_freed_when_the_lease_expires(make_system):
    system = make_system(lease_seconds=0.5)
    with grpc.insecure_channel(system.prefill_address) as channel:
        prefill = worker_pb2_grpc.PrefillWorkerStub(channel)
        response = prefill.Prefill(worker_pb2.PrefillRequest(
            request_id="orphan", prompt_token_ids=list(range(10, 30)),
            sampling=worker_pb2.SamplingParams(max_tokens=5, top_p=1.0, repetition_penalty=1.0)), timeout=10)
        assert response.kv_handle.num_blocks == 5  # 20 tokens in blocks of 4
        stats = prefill.GetStats(worker_pb2.GetStatsRequest())
        time.sleep(0.2)
        stats = prefill.GetStats(worker_pb2.GetStatsRequest())
        assert stats.num_total_blocks - stats.num_free_blocks == 5 and stats.num_held_leases == 1
    prefill_stats, _ = system.wait_until_idle(5)
    assert prefill_stats.num_free_blocks == prefill_stats.num_total_blocks
    assert prefill_stats.num_transfer_failures == 1 and prefill_stats.num_transfers == 0


def test_hand_offs_wait_for_free_decode_blocks_and_all_finish(make_system, tiny_folder, tiny_model):
    system = make_system(decode_overrides={"num_kv_blocks": 32})  # room for ~2 of these requests at once
    prompts = [list(range(100 + 7 * i, 160 + 7 * i)) for i in range(4)]  # 60 tokens = 15 blocks each
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    expected = single_engine_tokens(tiny_folder, tiny_model, prompts, params)
    results = [None] * len(prompts)
    with grpc.insecure_channel(system.frontend_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        def run(index):
            results[index] = _generate(stub, g.GenerateRequest(
                token_ids=g.TokenIds(ids=prompts[index]),
                sampling=g.SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)))[0]

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    assert results == expected
    assert_idle(system)


def test_no_free_decode_blocks_for_too_long_is_resource_exhausted(make_system):
    from services.decode.worker import DecodeLimits

    system = make_system(decode_overrides={"num_kv_blocks": 32}, decode_limits=DecodeLimits(admission_timeout_seconds=0.5))
    engine = system.decode_worker.engine
    system.decode_worker.thread.call(lambda: engine.reserve_kv("hog", list(range(120)))).result(5)  # 30 of 32 blocks
    with grpc.insecure_channel(system.frontend_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            _generate(stub, g.GenerateRequest(token_ids=g.TokenIds(ids=list(range(200, 240))),
                                              sampling=g.SamplingParams(max_tokens=5, ignore_eos=True)))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "KV blocks" in info.value.details()
    system.decode_worker.thread.call(lambda: engine.abort_request("hog")).result(5)
    assert_idle(system)
