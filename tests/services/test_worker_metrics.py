"""The workers fill vLLM's request metrics: after N requests the decode worker counts N finished requests,
N time-to-first-token and e2e samples and one inter-token gap per later token; the prefill worker
counts every token #1 and the requests that end with it (docs/observability.md)."""

import threading
import time

import grpc

from protos import generation_pb2 as g
from protos import generation_pb2_grpc

LABELS = {"model_name": "tiny"}
MAX_TOKENS = 6


def _sample(system, role: str, name: str, **labels) -> float:
    value = system.observability[role].metrics.registry.get_sample_value(name, {**LABELS, "role": role, **labels})
    return 0.0 if value is None else value


def _success(system, role: str) -> dict[str, float]:
    return {reason: _sample(system, role, "tandem:request_success_total", finished_reason=reason)
            for reason in ("stop", "length", "abort", "error")}


def _wait_for(condition, timeout_seconds: float = 10.0) -> None:
    """The abort's bookkeeping ends on the engine thread shortly after the client saw CANCELLED."""
    deadline = time.monotonic() + timeout_seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def _generate_all(stub, requests: list[g.GenerateRequest]) -> list:
    results = [None] * len(requests)

    def run(index):
        results[index] = list(stub.Generate(requests[index], timeout=60))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_after_n_requests_the_workers_count_n(make_system):
    system = make_system()
    prompts = [list(range(30 + i, 42 + 2 * i)) for i in range(5)]
    handed_off = [g.GenerateRequest(token_ids=g.TokenIds(ids=p), sampling=g.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)) for p in prompts[:4]]
    ends_at_prefill = g.GenerateRequest(token_ids=g.TokenIds(ids=prompts[4]),
                                        sampling=g.SamplingParams(max_tokens=1, temperature=0))
    with grpc.insecure_channel(system.frontend_address) as channel:
        results = _generate_all(generation_pb2_grpc.GenerationStub(channel), [*handed_off, ends_at_prefill])
    assert [r[-1].final.usage.completion_tokens for r in results] == [MAX_TOKENS] * 4 + [1]
    num_handed_off = len(handed_off)

    assert _success(system, "decode") == {"stop": 0, "length": num_handed_off, "abort": 0, "error": 0}
    assert _sample(system, "decode", "tandem:time_to_first_token_seconds_count") == num_handed_off
    assert _sample(system, "decode", "tandem:time_to_first_token_seconds_sum") > 0
    # token #1 comes from prefill and token #2 is the decode worker's first: MAX_TOKENS - 2 gaps each
    assert _sample(system, "decode", "tandem:inter_token_latency_seconds_count") == num_handed_off * (MAX_TOKENS - 2)
    assert _sample(system, "decode", "tandem:e2e_request_latency_seconds_count") == num_handed_off
    assert _sample(system, "decode", "tandem:generation_tokens_total") == num_handed_off * (MAX_TOKENS - 1)

    assert _sample(system, "prefill", "tandem:prompt_tokens_total") == sum(len(p) for p in prompts)
    assert _sample(system, "prefill", "tandem:time_to_first_token_seconds_count") == len(prompts)
    assert _success(system, "prefill") == {"stop": 0, "length": 1, "abort": 0, "error": 0}
    assert _sample(system, "prefill", "tandem:e2e_request_latency_seconds_count") == 1
    assert _sample(system, "prefill", "tandem:inter_token_latency_seconds_count") == 0


def test_an_aborted_request_is_counted_once_as_abort(make_system):
    system = make_system()
    with grpc.insecure_channel(system.frontend_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        stream = stub.Generate(g.GenerateRequest(request_id="metrics-abort", token_ids=g.TokenIds(ids=[5] * 20),
                                                 sampling=g.SamplingParams(max_tokens=100, ignore_eos=True)))
        next(stream)
        next(stream)  # a decoded token: the request runs on the decode worker
        assert stub.Abort(g.AbortRequest(request_id="metrics-abort")).was_running
        try:
            list(stream)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.CANCELLED
    system.wait_until_idle()
    _wait_for(lambda: sum(_success(system, "decode").values()) > 0)
    time.sleep(0.2)  # a second count would show up by now
    assert _success(system, "decode") == {"stop": 0, "length": 0, "abort": 1, "error": 0}
    assert _sample(system, "decode", "tandem:e2e_request_latency_seconds_count") == 1
    assert sum(_success(system, "prefill").values()) == 0  # handed off: the decode worker counts it


def test_a_repeated_prompt_counts_prefix_cache_hits_on_the_prefill_worker(make_system):
    system = make_system()
    prompt = list(range(100, 164))  # 64 tokens: whole KV blocks the second request can reuse
    request = g.GenerateRequest(token_ids=g.TokenIds(ids=prompt), sampling=g.SamplingParams(
        max_tokens=2, temperature=0, ignore_eos=True))
    with grpc.insecure_channel(system.frontend_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        first = list(stub.Generate(request, timeout=60))
        _wait_for(lambda: _sample(system, "prefill", "tandem:prefix_cache_queries_total") > 0)
        assert _sample(system, "prefill", "tandem:prefix_cache_hits_total") == 0
        second = list(stub.Generate(request, timeout=60))
    assert [m.WhichOneof("kind") for m in first] == [m.WhichOneof("kind") for m in second]
    _wait_for(lambda: _sample(system, "prefill", "tandem:prefix_cache_hits_total") > 0)
    hits = _sample(system, "prefill", "tandem:prefix_cache_hits_total")
    assert 0 < hits < len(prompt)  # the cached blocks, never the last token (it is computed for logits)
    assert _sample(system, "prefill", "tandem:prefix_cache_queries_total") >= 2 * len(prompt) - 1
