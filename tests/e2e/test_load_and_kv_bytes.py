"""2 prefill + 2 decode workers: 32 concurrent requests all finish, every worker serves some, and each
hand-off moves exactly the request's KV over UCX (whole blocks; nothing of it in gRPC messages)."""

from concurrent.futures import ThreadPoolExecutor

import grpc

from protos import generation_pb2 as g
from protos import worker_pb2, worker_pb2_grpc
from tests.e2e.cluster import wait_for_empty_pools, worker_stats
from tests.e2e.observability_helpers import kv_bytes

NUM_REQUESTS = 32
MAX_TOKENS = 12


def _run(stub, index: int) -> g.Final:
    words = " ".join(["word"] * (index * 3 % 40))  # prompts of different lengths -> different block counts
    request = g.GenerateRequest(text=f"Request {index}: {words} continue",
                                sampling=g.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
    responses = list(stub.Generate(request, timeout=600))
    return responses[-1].final


def test_concurrent_requests_spread_over_every_worker_and_move_exact_kv(cluster, stub):
    before = {a: worker_stats(a, role) for a, role in cluster.main_workers.items()}
    with ThreadPoolExecutor(NUM_REQUESTS) as pool:
        finals = list(pool.map(lambda i: _run(stub, i), range(NUM_REQUESTS)))
    assert all(f.finish_reason == g.FINISH_REASON_LENGTH and f.usage.completion_tokens == MAX_TOKENS for f in finals)
    after = wait_for_empty_pools(cluster.main_workers)
    for address, stats in after.items():
        assert stats.num_requests_served > before[address].num_requests_served, f"{address} served nothing"
        assert stats.num_free_blocks == stats.num_total_blocks
    layout = after[cluster.decode[0]].layout
    expected_bytes = sum(kv_bytes(f.usage.prompt_tokens, layout) for f in finals)
    for role, addresses in (("prefill", cluster.prefill), ("decode", cluster.decode)):
        moved = sum(after[a].num_transfer_bytes - before[a].num_transfer_bytes for a in addresses)
        count = sum(after[a].num_transfers - before[a].num_transfers for a in addresses)
        assert (count, moved) == (NUM_REQUESTS, expected_bytes), role


def test_one_hand_off_by_hand_reports_ucx_bytes_and_keeps_kv_out_of_grpc(cluster):
    prompt_token_ids = list(range(1000, 1037))  # 37 tokens -> 3 blocks of 16
    sampling = worker_pb2.SamplingParams(max_tokens=4, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
                                         ignore_eos=True)
    with grpc.insecure_channel(cluster.prefill[0]) as p, grpc.insecure_channel(cluster.decode[0]) as d:
        prefill = worker_pb2_grpc.PrefillWorkerStub(p)
        decode = worker_pb2_grpc.DecodeWorkerStub(d)
        response = prefill.Prefill(worker_pb2.PrefillRequest(
            request_id="by-hand", prompt_token_ids=prompt_token_ids, sampling=sampling), timeout=120)
        layout = response.kv_handle.layout
        expected = kv_bytes(len(prompt_token_ids), layout)
        assert response.kv_handle.num_blocks == 3 and response.kv_handle.num_tokens == 37
        assert response.ByteSize() < 1024 < expected  # the handle names the KV; it does not carry it
        stream = list(decode.Decode(worker_pb2.DecodeRequest(
            request_id="by-hand", prompt_token_ids=prompt_token_ids, first_token_id=response.first_token_id,
            sampling=sampling, kv_handle=response.kv_handle), timeout=120))
    final = stream[-1].final
    assert final.transfer.num_bytes == expected and final.transfer.num_blocks == 3
    assert final.transfer.transport not in ("", "fake", "none")  # a UCX transport (tcp, shared memory, ...)
    assert final.num_generated_tokens == 4 and all(m.ByteSize() < 1024 for m in stream)
    wait_for_empty_pools(cluster.main_workers)
