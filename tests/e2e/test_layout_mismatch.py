"""Workers with different block sizes: the hand-off fails with an error naming the mismatch, the
client sees it, and no KV block stays allocated on either worker."""

import grpc
import pytest

from protos import generation_pb2 as g
from protos import generation_pb2_grpc
from tests.e2e.cluster import is_serving, wait_for_empty_pools, worker_stats
from tests.e2e.conftest import ODD_DECODE_BLOCK_SIZE


def test_block_size_mismatch_is_reported_and_nothing_leaks(cluster):
    failures_before = worker_stats(cluster.odd_prefill, "prefill").num_transfer_failures
    request = g.GenerateRequest(text="Hello, how are you today?",
                                sampling=g.SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    with grpc.insecure_channel(cluster.odd_frontend) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Generate(request, timeout=120))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"block_size: prefill=16 decode={ODD_DECODE_BLOCK_SIZE}" in info.value.details()
    stats = wait_for_empty_pools(cluster.odd_workers)
    for address, worker in stats.items():
        assert worker.num_free_blocks == worker.num_total_blocks and worker.num_held_leases == 0, address
    # freed by the frontend's Abort at once, not by the lease running out
    assert stats[cluster.odd_prefill].num_transfer_failures == failures_before
    assert all(is_serving(a) for a in (cluster.odd_frontend, cluster.odd_prefill, cluster.odd_decode))
