"""Colocated serving and conditional disaggregation through real gRPC servers in one process (tiny model,
fake KV transfer): a decode-side worker prefills `prefill_here` requests itself and streams token #1
like every later token; a cluster with colocated workers and a prefill/decode pair sends short prompts
straight to a worker with room and long ones through the prefill worker. Tokens equal one engine's,
every field of a prefill-here request is checked, and no block outlives its request however it ended.
"""

import threading
import time

import grpc
import pytest

from common.engine.sampling_params import SamplingParams
from protos import generation_pb2 as g
from protos import generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from services.decode.jobs import DecodeLimits
from services.decode.main import parse_kv_senders
from tests.services.inprocess import ENGINE_SETTINGS, assert_idle, decode_stats, single_engine_tokens

SHORT_PROMPTS = [[5, 17, 300, 41, 9], [1000, 2000, 3000], [7] * 8]
LONG_PROMPTS = [list(range(50, 71)), list(range(200, 230))]
LOCAL_PREFILL_LENGTH = 8


def _generate(address: str, prompt: list[int], timeout: float = 60, **sampling) -> tuple[list[int], g.GenerateResponse]:
    request = g.GenerateRequest(token_ids=g.TokenIds(ids=prompt), sampling=g.SamplingParams(**sampling))
    with grpc.insecure_channel(address) as channel:
        responses = list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=timeout))
    token_ids = [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]
    assert responses[-1].HasField("final")
    return token_ids, responses[-1].final


def _generate_all(address: str, prompts: list[list[int]], **sampling) -> list[list[int]]:
    results = [None] * len(prompts)

    def run(index):
        results[index] = _generate(address, prompts[index], **sampling)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def _decode_side_stats(system) -> list[worker_pb2.WorkerStats]:
    return [decode_stats(address) for address in (system.decode_address, *system.colocated_addresses)]


@pytest.fixture(scope="module")
def colocated_system(tiny_folder, tiny_model):
    """Colocated serving: the frontend knows no prefill worker; a decode worker and a colocated worker
    prefill every prompt themselves."""
    from tests.services.inprocess import InProcessSystem

    model, model_config = tiny_model
    system = InProcessSystem(tiny_folder, model, model_config, num_colocated=1, routes_to_prefill=False,
                             colocated_overrides={"num_kv_blocks": 40}).start()
    yield system
    system.stop()


@pytest.mark.parametrize("sampling", [
    dict(temperature=0.0),
    dict(temperature=0.9, top_p=0.9, top_k=50, seed=123, repetition_penalty=1.1),
])
def test_colocated_workers_give_one_engines_tokens_and_move_no_kv(colocated_system, tiny_folder, tiny_model,
                                                                  sampling):
    prompts = SHORT_PROMPTS + LONG_PROMPTS
    colocated_system.wait_until_idle()
    served_before = sum(s.num_requests_served for s in _decode_side_stats(colocated_system))
    expected = single_engine_tokens(tiny_folder, tiny_model, prompts,
                                     SamplingParams(max_tokens=12, ignore_eos=True, **sampling))
    assert _generate_all(colocated_system.frontend_address, prompts, max_tokens=12, ignore_eos=True,
                         **sampling) == expected
    prefill, _ = colocated_system.wait_until_idle()
    decode_side = _decode_side_stats(colocated_system)
    assert prefill.num_requests_served == 0  # never asked: the frontend has no prefill address
    assert sum(s.num_transfers for s in decode_side) == 0
    assert sum(s.num_requests_served for s in decode_side) - served_before == len(prompts)
    assert_idle(colocated_system)


def test_first_token_can_end_a_colocated_request(colocated_system, tiny_folder, tiny_model):
    [[first]] = single_engine_tokens(tiny_folder, tiny_model, SHORT_PROMPTS[:1], SamplingParams(max_tokens=1))
    token_ids, final = _generate(colocated_system.frontend_address, SHORT_PROMPTS[0], max_tokens=3,
                                 stop_token_ids=[first])
    assert token_ids == [first] and final.finish_reason == g.FINISH_REASON_STOP
    assert final.usage.completion_tokens == 1
    assert_idle(colocated_system)


def _prefill_here(request_id: str, prompt: list[int], max_tokens: int = 8, **fields) -> worker_pb2.DecodeRequest:
    sampling = worker_pb2.SamplingParams(max_tokens=max_tokens, temperature=0, top_p=1.0, repetition_penalty=1.0,
                                         ignore_eos=True)
    return worker_pb2.DecodeRequest(**{"request_id": request_id, "prompt_token_ids": prompt, "sampling": sampling,
                                       "prefill_here": True, **fields})


def _direct_decode(address: str, request: worker_pb2.DecodeRequest) -> list[worker_pb2.DecodeResponse]:
    with grpc.insecure_channel(address) as channel:
        return list(worker_pb2_grpc.DecodeWorkerStub(channel).Decode(request, timeout=30))


def test_a_direct_prefill_here_call_streams_token_1_and_reports_no_transfer(colocated_system, tiny_folder,
                                                                            tiny_model):
    [expected] = single_engine_tokens(tiny_folder, tiny_model, LONG_PROMPTS[:1],
                                       SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.0))
    responses = _direct_decode(colocated_system.colocated_addresses[0], _prefill_here("direct", LONG_PROMPTS[0]))
    assert [t for r in responses if r.HasField("tokens") for t in r.tokens.token_ids] == expected
    final = responses[-1].final
    assert final.num_generated_tokens == 8 and final.finish_reason == worker_pb2.FINISH_REASON_LENGTH
    assert final.transfer == worker_pb2.TransferStats()  # nothing was pulled
    assert_idle(colocated_system)


def test_every_field_of_a_prefill_here_request_is_checked(colocated_system):
    address = colocated_system.colocated_addresses[0]
    handle = worker_pb2.KVHandle(transfer_id="ab" * 16, sender_address="fake:1", num_tokens=5, num_blocks=2)
    cases = {
        "kv_handle": _prefill_here("h1", SHORT_PROMPTS[0], kv_handle=handle),
        "first_token_id": _prefill_here("h2", SHORT_PROMPTS[0], first_token_id=42),
        "prompt_token_ids": _prefill_here("h3", [5, 49152]),
        "prompt_token_ids ": _prefill_here("h4", []),
        "prompt_token_ids  ": _prefill_here("h8", [3] * ENGINE_SETTINGS["max_model_len"]),
        "sampling.top_p": _prefill_here("h5", SHORT_PROMPTS[0], sampling=worker_pb2.SamplingParams(max_tokens=4)),
        "sampling.num_output_tokens_before": _prefill_here(
            "h6", SHORT_PROMPTS[0], sampling=worker_pb2.SamplingParams(max_tokens=4, top_p=1.0,
                                                                       num_output_tokens_before=5)),
    }
    for field, request in cases.items():
        with pytest.raises(grpc.RpcError) as error:
            _direct_decode(address, request)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, error.value.details())
        assert error.value.details().startswith(field.strip()), (field, error.value.details())
    without_either = worker_pb2.DecodeRequest(request_id="h7", prompt_token_ids=SHORT_PROMPTS[0],
                                              sampling=_prefill_here("x", [1]).sampling)
    with pytest.raises(grpc.RpcError) as error:
        _direct_decode(address, without_either)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prefill_here" in error.value.details()
    assert_idle(colocated_system)


def test_a_prompt_that_finds_no_blocks_in_time_is_resource_exhausted_and_frees_everything(make_system):
    colocated_system = make_system(num_colocated=1, routes_to_prefill=False,
                                   decode_limits=DecodeLimits(admission_timeout_seconds=0.5))
    worker = colocated_system.colocated_workers[0]
    held = _hold_every_free_block(colocated_system, worker)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as error:
            _direct_decode(colocated_system.colocated_addresses[0], _prefill_here("starved", SHORT_PROMPTS[0]))
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.value.details()
        assert 0.5 <= time.monotonic() - started < 10
    finally:
        _release(colocated_system, worker, held)
    assert_idle(colocated_system)


def _hold_every_free_block(system, worker) -> list[int]:
    """Takes every free block of the worker's pool (as hand-offs in flight would), on its engine thread."""
    allocator = worker.engine.allocator
    return system.run(worker.thread.run(lambda: allocator.allocate(allocator.num_free_blocks)))


def _release(system, worker, block_ids: list[int]) -> None:
    system.run(worker.thread.run(lambda: worker.engine.allocator.free(block_ids)))


def test_abort_cancel_and_deadline_free_a_running_colocated_request(colocated_system):
    request = g.GenerateRequest(request_id="to-abort", token_ids=g.TokenIds(ids=LONG_PROMPTS[1]),
                                sampling=g.SamplingParams(max_tokens=100, ignore_eos=True))
    with grpc.insecure_channel(colocated_system.frontend_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        stream = stub.Generate(request, timeout=60)
        assert next(stream).chunk.token_ids  # running on its worker
        assert stub.Abort(g.AbortRequest(request_id="to-abort")).was_running
        with pytest.raises(grpc.RpcError) as error:
            list(stream)
        assert error.value.code() == grpc.StatusCode.CANCELLED
        assert_idle(colocated_system)
        stream = stub.Generate(request, timeout=60)
        next(stream)
        stream.cancel()  # the client goes away mid-stream
        assert_idle(colocated_system)
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(request, timeout=0.2))
        assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_idle(colocated_system)


def test_a_closed_decode_stream_frees_requests_still_queued_for_their_prefill(colocated_system):
    """Requests the worker has not started yet (waiting in its engine for blocks) are freed when the
    stream that brought them closes."""
    worker = colocated_system.colocated_workers[0]
    held = _hold_every_free_block(colocated_system, worker)
    try:
        with grpc.insecure_channel(colocated_system.colocated_addresses[0]) as channel:
            requests = iter([worker_pb2.DecodeStreamRequest(decodes=worker_pb2.DecodeRequestBatch(requests=[
                _prefill_here(f"queued-{i}", SHORT_PROMPTS[i]) for i in range(3)]))])
            call = worker_pb2_grpc.DecodeWorkerStub(channel).DecodeStream(
                _then_wait(requests, seconds=0.3), timeout=30)
            deadline = time.monotonic() + 5
            while decode_stats(colocated_system.colocated_addresses[0]).num_waiting < 3:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            call.cancel()
            while decode_stats(colocated_system.colocated_addresses[0]).num_waiting > 0:  # freed by the cancel
                assert time.monotonic() < deadline + 5
                time.sleep(0.05)
    finally:
        _release(colocated_system, worker, held)
    assert_idle(colocated_system)


def _then_wait(requests, seconds: float):
    yield from requests
    time.sleep(seconds * 10)  # keep the stream open until the test cancels it


def test_allowed_kv_senders_none_refuses_every_hand_off():
    assert parse_kv_senders("none") == frozenset()
    assert parse_kv_senders("h:1,g:2") == frozenset({"h:1", "g:2"}) and parse_kv_senders(None) is None


@pytest.fixture(scope="module")
def mixed_system(tiny_folder, tiny_model):
    """A prefill/decode pair and a colocated worker in one cluster, prompts of up to 8 tokens kept local."""
    from tests.services.inprocess import InProcessSystem

    model, model_config = tiny_model
    system = InProcessSystem(tiny_folder, model, model_config, num_colocated=1,
                             frontend_overrides={"max_local_prefill_length": LOCAL_PREFILL_LENGTH}).start()
    yield system
    system.stop()


def test_a_mixed_cluster_prefills_short_prompts_on_decode_workers_and_long_ones_on_the_prefill_worker(
        mixed_system, tiny_folder, tiny_model):
    params = dict(max_tokens=10, ignore_eos=True, temperature=0.0)
    expected = single_engine_tokens(tiny_folder, tiny_model, SHORT_PROMPTS + LONG_PROMPTS,
                                     SamplingParams(**params))
    for index, prompt in enumerate(SHORT_PROMPTS + LONG_PROMPTS):  # one at a time: every worker has room
        prefill_before, _ = mixed_system.worker_stats()
        decode_side_before = _decode_side_stats(mixed_system)
        assert _generate(mixed_system.frontend_address, prompt, **params)[0] == expected[index]
        prefill_after, _ = mixed_system.worker_stats()
        decode_side_after = _decode_side_stats(mixed_system)
        is_long = len(prompt) > LOCAL_PREFILL_LENGTH
        assert prefill_after.num_requests_served - prefill_before.num_requests_served == int(is_long), prompt
        num_transfers = sum(a.num_transfers - b.num_transfers for a, b in zip(decode_side_after, decode_side_before))
        assert num_transfers == int(is_long), prompt
        mixed_system.wait_until_idle()
        time.sleep(0.25)  # the frontend's view of each worker's free blocks catches up (stats every 0.1 s)
    served = [s.num_requests_served for s in _decode_side_stats(mixed_system)]
    assert all(count > 0 for count in served), served  # both decode-side workers got requests
    assert_idle(mixed_system)
