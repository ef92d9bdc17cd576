"""`tandem serve` keeps its workers up: a decode worker killed with SIGKILL comes back SERVING on the same
port while every other service runs on untouched, and the frontend routes requests to it again.

Runs last among the e2e tests (by name) and leaves the shared system whole: the worker is back."""

import json
import os
import signal
import time

import grpc

from protos import generation_pb2 as g
from protos import generation_pb2_grpc
from tests.e2e.cluster import is_serving, worker_stats

BACK_WITHIN_SECONDS = 60.0


def _pids(cluster) -> dict[str, int]:
    return json.loads(cluster.serve.ready_file.read_text())["pids"]


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _generate(cluster) -> list[g.GenerateResponse]:
    request = g.GenerateRequest(text="Hello", sampling=g.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    with grpc.insecure_channel(cluster.frontend) as channel:
        return list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=60))


def test_a_killed_decode_worker_is_restarted_on_its_port_and_serves_again(cluster):
    before = _pids(cluster)
    address = cluster.decode[0]
    os.kill(before["decode-0"], signal.SIGKILL)
    killed_at = time.monotonic()

    while not (_pids(cluster)["decode-0"] != before["decode-0"] and is_serving(address)):
        assert time.monotonic() - killed_at < BACK_WITHIN_SECONDS, cluster.serve.log_tail(40)
        time.sleep(0.5)
    after = _pids(cluster)
    assert {n: p for n, p in after.items() if n != "decode-0"} == {n: p for n, p in before.items() if n != "decode-0"}
    assert all(_is_alive(pid) for pid in after.values())
    log = cluster.serve.log_tail(200)
    assert "decode-0 (pid %d) was killed by SIGKILL; restarting it in 1s on %s" % (before["decode-0"], address) in log
    assert f"decode-0 is back on {address}" in log

    # The frontend finds it again by its address: requests complete, and some of them run there.
    deadline = time.monotonic() + BACK_WITHIN_SECONDS
    while worker_stats(address, "decode").num_requests_served == 0:
        assert time.monotonic() < deadline, "the frontend never routed to the restarted decode worker"
        assert _generate(cluster)[-1].HasField("final")
        time.sleep(0.2)
