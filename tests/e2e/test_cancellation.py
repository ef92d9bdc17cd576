"""Client cancel, deadline and Abort end the request with the right status, and every worker's KV
pool returns to zero; a KV handle nobody pulls is freed when its lease expires."""

import time

import grpc
import pytest

from protos import generation_pb2 as g
from protos import worker_pb2, worker_pb2_grpc
from tests.e2e.cluster import wait_for_empty_pools, worker_stats
from tests.e2e.conftest import ODD_LEASE_SECONDS


def _long_request(request_id: str = "") -> g.GenerateRequest:
    request = g.GenerateRequest(text="Tell me a very long story about a lighthouse keeper.",
                                sampling=g.SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True))
    if request_id:
        request.request_id = request_id
    return request


def _assert_pools_empty(cluster):
    for address, stats in wait_for_empty_pools(cluster.main_workers).items():
        assert stats.num_free_blocks == stats.num_total_blocks, (address, stats)
        assert stats.num_running == stats.num_waiting == stats.num_held_leases == 0, (address, stats)


def test_client_cancel_mid_stream_frees_every_worker(cluster, stub):
    stream = stub.Generate(_long_request(), timeout=300)
    for _ in range(3):  # token #1 (from prefill) and two decoded chunks: the request is on both workers
        next(stream)
    stream.cancel()
    assert stream.code() == grpc.StatusCode.CANCELLED
    _assert_pools_empty(cluster)


def test_deadline_exceeded_frees_every_worker(cluster, stub):
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(_long_request(), timeout=2.0))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _assert_pools_empty(cluster)


def test_abort_ends_the_stream_cancelled_and_frees_every_worker(cluster, stub):
    stream = stub.Generate(_long_request("e2e-abort"), timeout=300)
    next(stream)
    assert stub.Abort(g.AbortRequest(request_id="e2e-abort"), timeout=10).was_running
    with pytest.raises(grpc.RpcError) as info:
        list(stream)
    assert info.value.code() == grpc.StatusCode.CANCELLED and "abort" in info.value.details()
    _assert_pools_empty(cluster)


def test_kv_never_pulled_is_freed_when_the_lease_expires(cluster):
    before = worker_stats(cluster.odd_prefill, "prefill")
    with grpc.insecure_channel(cluster.odd_prefill) as channel:
        prefill = worker_pb2_grpc.PrefillWorkerStub(channel)
        response = prefill.Prefill(worker_pb2.PrefillRequest(
            request_id="never-pulled", prompt_token_ids=list(range(500, 540)),
            sampling=worker_pb2.SamplingParams(max_tokens=8, temperature=0.0, top_p=1.0, repetition_penalty=1.0,
                                               ignore_eos=True)), timeout=60)
    assert response.kv_handle.num_blocks == 3  # 40 tokens in blocks of 16
    held = worker_stats(cluster.odd_prefill, "prefill")
    assert held.num_total_blocks - held.num_free_blocks == 3 and held.num_held_leases == 1
    start = time.monotonic()
    stats = wait_for_empty_pools({cluster.odd_prefill: "prefill"}, timeout_seconds=ODD_LEASE_SECONDS + 10)
    assert time.monotonic() - start < ODD_LEASE_SECONDS + 10
    stats = stats[cluster.odd_prefill]
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_held_leases == 0
    assert stats.num_transfer_failures == before.num_transfer_failures + 1  # released as EXPIRED
