"""`tandem frontend --api-server-count 2` against one colocated worker (dummy:tiny weights, token-id prompts):
both processes serve gRPC and HTTP, answer as one process does, Abort reaches a stream in either one,
SIGTERM stops them all, and a killed API server stops the whole frontend (it is not restarted)."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import urllib.request

import grpc
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from protos import generation_pb2 as g
from protos import generation_pb2_grpc
from tests.e2e.cluster import Process, Processes

pytestmark = pytest.mark.slow

MODEL_NAME = "SmolLM2-135M-Instruct"  # the frontend's tokenizer; the worker's weights are dummy:tiny (vocab 512)
PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], [42] * 12, [7, 300, 11, 480, 2 + 1]]
MAX_ATTEMPTS = 40  # new connections tried until the kernel has given each process one (2 ** -40 odds of failing)
STOP_WITHIN_SECONDS = 40.0


@pytest.fixture(scope="module")
def processes(tmp_path_factory):
    started = Processes(tmp_path_factory.mktemp("api-servers"))
    yield started
    started.stop()


@pytest.fixture(scope="module")
def worker_address(processes) -> str:
    worker = processes.start("worker", ["worker", "--model", "dummy:tiny", "--host", "127.0.0.1", "--port", "0",
                                        "--allowed-kv-senders", "none", "--kv-cache-memory", "32MiB"])
    return f"127.0.0.1:{worker.ready_info()['port']}"


def start_frontend(processes: Processes, name: str, worker_address: str, api_server_count: int) -> Process:
    return processes.start(name, ["frontend", "--host", "127.0.0.1", "--port", "0", "--http-port", "0",
                                  "--metrics-port", "0", "--decode-addresses", worker_address,
                                  "--api-server-count", str(api_server_count)])


@pytest.fixture(scope="module")
def one(processes, worker_address) -> Process:
    return start_frontend(processes, "frontend-1", worker_address, 1)


@pytest.fixture(scope="module")
def two(processes, worker_address) -> Process:
    return start_frontend(processes, "frontend-2", worker_address, 2)


def _request(prompt: list[int], max_tokens: int) -> g.GenerateRequest:
    return g.GenerateRequest(token_ids=g.TokenIds(ids=prompt),
                             sampling=g.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))


def grpc_generate(frontend: Process, prompt: list[int], max_tokens: int = 16) -> tuple[list[int], str]:
    """Over a connection of its own (a new channel), so the kernel picks a process for it anew."""
    with grpc.insecure_channel(f"127.0.0.1:{frontend.ready_info()['port']}") as channel:
        responses = list(generation_pb2_grpc.GenerationStub(channel).Generate(_request(prompt, max_tokens), timeout=60))
    assert responses[-1].final.finish_reason == g.FINISH_REASON_LENGTH
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks)


def http_generate(frontend: Process, prompt: list[int], max_tokens: int = 16) -> str:
    """/v1/completions over a connection of its own (urllib closes it after the answer)."""
    body = json.dumps({"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "ignore_eos": True}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{frontend.ready_info()['http_port']}/v1/completions", body,
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        choice = json.loads(response.read())["choices"][0]
    assert choice["finish_reason"] == "length"
    return choice["text"]


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels without model_name and role) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k not in ("model_name", "role")))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests_by_api_server(frontend: Process) -> dict[str, float]:
    """api_server_requests_total by process index, from the parent's --metrics-port (merged)."""
    samples = metrics(f"http://127.0.0.1:{frontend.ready_info()['metrics_port']}/metrics")
    return {dict(labels)["api_server"]: value for (name, labels), value in samples.items()
            if name == "tandem:api_server_requests_total"}


def test_the_ready_file_lists_each_api_server_a_child_of_the_frontend(two):
    info = two.ready_info()
    pids = info["api_server_pids"]
    assert len(set(pids)) == 2 and two.popen.pid not in pids
    assert sorted(child.pid for child in psutil.Process(two.popen.pid).children()) == sorted(pids)
    assert info["port"] > 0 and info["http_port"] > 0 and info["metrics_port"] > 0


@pytest.mark.parametrize("send", [grpc_generate, http_generate], ids=["grpc", "http"])
def test_requests_are_served_by_both_api_servers(two, send):
    before = requests_by_api_server(two)
    for attempt in range(MAX_ATTEMPTS):
        send(two, PROMPTS[attempt % len(PROMPTS)])
        after = requests_by_api_server(two)
        if all(after.get(index, 0) > before.get(index, 0) for index in ("0", "1")):
            break
    else:
        pytest.fail(f"{MAX_ATTEMPTS} connections, all served by one process: {before} -> {after}")
    assert sum(after.values()) - sum(before.values()) == attempt + 1


def test_every_metrics_endpoint_answers_for_both_api_servers(two):
    grpc_generate(two, PROMPTS[0])
    info = two.ready_info()
    merged = metrics(f"http://127.0.0.1:{info['metrics_port']}/metrics")
    num_admitted = sum(v for (name, _), v in merged.items() if name == "tandem:api_server_requests_total")
    assert merged[("tandem:request_success_total", (("finished_reason", "length"),))] == num_admitted
    assert merged[("tandem:num_requests_running", ())] == 0
    for _ in range(6):  # the HTTP port's /metrics, whichever process the connection reaches: the same sums
        assert metrics(f"http://127.0.0.1:{info['http_port']}/metrics") == merged


def test_greedy_output_equals_one_api_server(one, two):
    for prompt in PROMPTS:
        expected_ids, expected_text = grpc_generate(one, prompt, max_tokens=24)
        for _ in range(3):  # new connections: both processes answer some of them
            assert grpc_generate(two, prompt, max_tokens=24) == (expected_ids, expected_text)
        assert http_generate(two, prompt, max_tokens=24) == http_generate(one, prompt, max_tokens=24) == expected_text


def _abort_one_stream(frontend: Process, request_id: str) -> str:
    """Starts a long stream, checks that an Abort over another connection leaves it alone and one over its
    own stops it (CANCELLED); returns the index of the process that ran it."""
    address = f"127.0.0.1:{frontend.ready_info()['port']}"
    before = requests_by_api_server(frontend)
    request = _request(PROMPTS[0], max_tokens=1500)
    request.request_id = request_id
    # A channel of its own subchannel pool: another connection (channels alike otherwise share one).
    other_options = [("grpc.use_local_subchannel_pool", 1)]
    with grpc.insecure_channel(address) as channel, grpc.insecure_channel(address, other_options) as other_channel:
        stub, other = generation_pb2_grpc.GenerationStub(channel), generation_pb2_grpc.GenerationStub(other_channel)
        stream = stub.Generate(request, timeout=60)
        num_tokens = len(next(stream).chunk.token_ids)
        assert not other.Abort(g.AbortRequest(request_id=request_id), timeout=10).was_running
        assert stub.Abort(g.AbortRequest(request_id=request_id), timeout=10).was_running
        with pytest.raises(grpc.RpcError) as error:
            for response in stream:
                assert not response.HasField("final")
                num_tokens += len(response.chunk.token_ids)
        assert error.value.code() == grpc.StatusCode.CANCELLED
        assert num_tokens < 1500
    after = requests_by_api_server(frontend)
    (index,) = [i for i in after if after[i] > before.get(i, 0)]
    return index


def test_abort_reaches_the_stream_over_its_own_connection_in_either_api_server(two):
    aborted_in = set()
    for attempt in range(MAX_ATTEMPTS):
        aborted_in.add(_abort_one_stream(two, f"abort-{attempt}"))
        if aborted_in == {"0", "1"}:
            return
    pytest.fail(f"{MAX_ATTEMPTS} connections, all served by API server {aborted_in}")


def _wait_exit(process: Process) -> int:
    try:
        return process.popen.wait(STOP_WITHIN_SECONDS)
    except Exception:  # noqa: BLE001 - report with the log
        pytest.fail(f"{process.name} still running {STOP_WITHIN_SECONDS:.0f}s later:\n{process.log_tail()}")


def _is_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_sigterm_stops_every_api_server_and_frees_the_ports(processes, worker_address):
    frontend = start_frontend(processes, "frontend-sigterm", worker_address, 2)
    info = frontend.ready_info()
    grpc_generate(frontend, PROMPTS[0])
    frontend.popen.send_signal(signal.SIGTERM)
    assert _wait_exit(frontend) == 0, frontend.log_tail()
    assert all(_is_gone(pid) for pid in info["api_server_pids"])
    for port in (info["port"], info["http_port"], info["metrics_port"]):
        with socket.socket() as probe:  # nothing holds it any more (SO_REUSEADDR: TIME_WAIT does not count)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", port))
    assert "SIGTERM received, stopping 2 API servers" in frontend.log_tail(50)


def test_a_killed_api_server_stops_the_whole_frontend(processes, worker_address):
    frontend = start_frontend(processes, "frontend-killed", worker_address, 2)
    first, second = frontend.ready_info()["api_server_pids"]
    os.kill(second, signal.SIGKILL)
    assert _wait_exit(frontend) == 1
    assert _is_gone(first)
    assert (f"API server 1 (pid {second}) was killed by SIGKILL: stopping the frontend (an API server is not "
            f"restarted)") in frontend.log_tail(50)


def test_one_api_server_is_the_frontend_process_itself(one):
    info = one.ready_info()
    assert set(info) == {"port", "http_port", "metrics_port", "otlp_traces_endpoint"}
    assert psutil.Process(one.popen.pid).children() == []
    listening = {c.laddr.port for c in psutil.Process(one.popen.pid).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN}
    assert {info["port"], info["http_port"], info["metrics_port"]} <= listening
    grpc_generate(one, PROMPTS[0])
    assert set(requests_by_api_server(one)) == {"0"}
