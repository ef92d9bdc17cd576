"""Mid-stream migration across real processes: a decode worker SIGKILLed while it streams greedy requests;
each of them moves (re-prefill of prompt + the tokens already sent, decode on the other worker) and ends
with exactly the token ids of an undisturbed run, none repeated or lost. `tandem serve` brings the worker
back on its port, so the shared system is whole again afterwards."""

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from protos import generation_pb2 as g
from tests.e2e.cluster import is_serving, wait_for_empty_pools, worker_stats

PROMPTS = ["The lighthouse keeper", "Once upon a time, in a small village", "The recipe calls for",
           "Rivers flow to the sea because"]
MAX_TOKENS = 48
NUM_TOKENS_BEFORE_KILL = 4  # every stream has this many tokens before the kill: each request is decoding
BACK_WITHIN_SECONDS = 60.0


def _request(text: str) -> g.GenerateRequest:
    return g.GenerateRequest(text=text, sampling=g.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                                  ignore_eos=True))


def _token_ids(responses) -> list[int]:
    return [token_id for response in responses if response.HasField("chunk") for token_id in response.chunk.token_ids]


def _pids(cluster) -> dict[str, int]:
    return json.loads(cluster.serve.ready_file.read_text())["pids"]


def test_streams_finish_unchanged_when_their_decode_worker_is_killed(cluster, stub):
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        expected = list(pool.map(lambda text: _token_ids(stub.Generate(_request(text), timeout=300)), PROMPTS))
    assert all(len(token_ids) == MAX_TOKENS for token_ids in expected)

    streams = [stub.Generate(_request(text), timeout=300) for text in PROMPTS]
    received: list[list[int]] = [[] for _ in PROMPTS]
    for stream, token_ids in zip(streams, received):
        while len(token_ids) < NUM_TOKENS_BEFORE_KILL:
            token_ids += next(stream).chunk.token_ids
    # The last decode worker (the router spreads the four over both): decode-0 is test_serve_supervision's,
    # which expects the launcher's first-restart delay for it.
    index = len(cluster.decode) - 1
    assert worker_stats(cluster.decode[index], "decode").num_running > 0
    before = _pids(cluster)
    os.kill(before[f"decode-{index}"], signal.SIGKILL)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        rests = list(pool.map(list, streams))
    for text, token_ids, rest, want in zip(PROMPTS, received, rests, expected):
        assert rest[-1].HasField("final") and rest[-1].final.finish_reason == g.FINISH_REASON_LENGTH, text
        assert token_ids + _token_ids(rest) == want, text
    frontend_log = cluster.serve.log_path.parent / "serve" / "frontend.log"
    assert "migrating it after" in frontend_log.read_text(errors="replace")

    # The launcher brings the worker back; the system is whole and every pool empty again.
    address = cluster.decode[index]
    killed_at = time.monotonic()
    while not (_pids(cluster)[f"decode-{index}"] != before[f"decode-{index}"] and is_serving(address)):
        assert time.monotonic() - killed_at < BACK_WITHIN_SECONDS, cluster.serve.log_tail(40)
        time.sleep(0.5)
    for address, stats in wait_for_empty_pools(cluster.main_workers).items():
        assert stats.num_free_blocks == stats.num_total_blocks and stats.num_held_leases == 0, (address, stats)
