"""`tandem serve --colocated`: real processes, two colocated workers and a frontend, no prefill worker.
Greedy outputs of concurrent requests equal `tandem offline` token for token and text for text, no KV
moves, and every worker's pool is empty afterwards."""

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from protos import generation_pb2_grpc
from tests.e2e.cluster import ENGINE_ARGS, REPO_ROOT, TANDEM, Processes, service_env, wait_for_empty_pools
from tests.e2e.test_offline_parity import MAX_TOKENS, PROMPTS, _served_token_ids


@pytest.fixture(scope="module")
def colocated_serve(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("e2e-colocated")
    processes = Processes(log_dir)
    try:
        serve = processes.start("serve", ["serve", "--colocated", "--num-workers", "2", "--port", "0",
                                          "--http-port", "-1", "--log-dir", str(log_dir / "serve"), *ENGINE_ARGS])
        yield serve.ready_info()
    finally:
        processes.stop()


def test_colocated_serving_equals_offline_and_moves_no_kv(colocated_serve, tmp_path):
    assert colocated_serve["prefill"] == [] and len(colocated_serve["decode"]) == 2
    input_path, output_path = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    input_path.write_text("".join(json.dumps({**p, "max_tokens": MAX_TOKENS, "temperature": 0}) + "\n"
                                  for p in PROMPTS))
    offline = subprocess.Popen([*TANDEM, "offline", "--input", str(input_path), "--output", str(output_path),
                                *ENGINE_ARGS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=service_env(), cwd=REPO_ROOT)
    with grpc.insecure_channel(colocated_serve["frontend"]) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            served = list(pool.map(lambda p: _served_token_ids(stub, p), PROMPTS))
    log, _ = offline.communicate(timeout=600)
    assert offline.returncode == 0, log
    expected = [json.loads(line) for line in output_path.read_text().splitlines()]
    for (token_ids, text), reference in zip(served, expected):
        assert token_ids == reference["token_ids"]
        assert text == reference["text"]
    stats = wait_for_empty_pools({address: "decode" for address in colocated_serve["decode"]})
    assert all(s.num_free_blocks == s.num_total_blocks and s.num_running == 0 for s in stats.values()), stats
    assert sum(s.num_requests_served for s in stats.values()) == len(PROMPTS)
    assert all(s.num_requests_served > 0 for s in stats.values())  # both workers served
    assert sum(s.num_transfers for s in stats.values()) == 0
