"""Mid-stream migration across real processes: under `tandem serve` (2 prefill + 2 decode workers), a
decode worker is SIGKILLed while it streams 8 greedy requests; each of its requests moves (re-prefill of
prompt + the tokens already sent, decode on the other worker) and every one of the 8 ends with exactly
the token ids of an undisturbed run, none repeated or lost. The supervisor brings the worker back on its
port, SERVING, within BACK_WITHIN_SECONDS of the kill, so the shared system is whole again afterwards.

Every wait is on observable state (tokens received, GetModelInfo, GetStats, health, the ready file's
pids), never a sleep standing in for one:
- before starting, both decode workers are routable and every pool is idle, and the 8 prompts share no
  prefix, so the router spreads the 8 streams over both workers (the second run follows the blocks the
  first left on each) and the killed one surely serves some;
- the ready file is rewritten in place when a worker comes back: a half-written one is read again.
"""

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

from protos import generation_pb2 as g
from tests.e2e.cluster import is_serving, wait_for_empty_pools, worker_stats

# Token-id prompts with no block in common (a text prompt would start with the chat template's system
# prompt): the cache-aware router then has no shared prefix to keep them together, and balances them.
PROMPTS = [[200 + 97 * index + offset for offset in range(12 + index)] for index in range(8)]
MAX_TOKENS = 48
NUM_TOKENS_BEFORE_KILL = 4  # every stream has this many tokens before the kill: each request is decoding
BACK_WITHIN_SECONDS = 60.0
SETTLE_SECONDS = 60.0  # for earlier tests' requests to end and every worker to be routable


def _request(prompt: list[int]) -> g.GenerateRequest:
    return g.GenerateRequest(token_ids=g.TokenIds(ids=prompt), sampling=g.SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))


def _token_ids(responses) -> list[int]:
    return [token_id for response in responses if response.HasField("chunk") for token_id in response.chunk.token_ids]


def _pids(cluster) -> dict[str, int]:
    """The services' pids from the ready file, which the launcher rewrites in place after a restart."""
    for _ in range(100):
        try:
            return json.loads(cluster.serve.ready_file.read_text())["pids"]
        except json.JSONDecodeError:  # caught between its truncation and its write
            time.sleep(0.01)
    raise AssertionError(f"{cluster.serve.ready_file} stays unreadable")


def _wait_until_settled(cluster, stub) -> None:
    """Every pool idle and the frontend routing to every decode worker."""
    for address, stats in wait_for_empty_pools(cluster.main_workers, SETTLE_SECONDS).items():
        assert stats.num_free_blocks == stats.num_total_blocks and stats.num_held_leases == 0, (address, stats)
    deadline = time.monotonic() + SETTLE_SECONDS
    while stub.GetModelInfo(g.GetModelInfoRequest(), timeout=10).num_decode_workers < len(cluster.decode):
        assert time.monotonic() < deadline, "the frontend does not route to every decode worker"
        time.sleep(0.2)


def _wait_until_back(cluster, name: str, address: str, old_pid: int, killed_at: float) -> None:
    while not (_pids(cluster)[name] != old_pid and is_serving(address)):
        assert time.monotonic() - killed_at < BACK_WITHIN_SECONDS, cluster.serve.log_tail(40)
        time.sleep(0.2)


def test_eight_streams_finish_unchanged_when_their_decode_worker_is_killed(cluster, stub):
    _wait_until_settled(cluster, stub)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        expected = list(pool.map(lambda prompt: _token_ids(stub.Generate(_request(prompt), timeout=300)), PROMPTS))
    assert all(len(token_ids) == MAX_TOKENS for token_ids in expected)
    _wait_until_settled(cluster, stub)

    streams = [stub.Generate(_request(prompt), timeout=300) for prompt in PROMPTS]
    received: list[list[int]] = [[] for _ in PROMPTS]
    for stream, token_ids in zip(streams, received):
        while len(token_ids) < NUM_TOKENS_BEFORE_KILL:
            token_ids += next(stream).chunk.token_ids
    # The last decode worker: decode-0's first restart belongs to test_serve_supervision, which expects
    # the launcher's first-restart delay for it.
    index = len(cluster.decode) - 1
    name, address = f"decode-{index}", cluster.decode[index]
    num_running = worker_stats(address, "decode").num_running
    assert 0 < num_running < len(PROMPTS), f"{name} runs {num_running} of the {len(PROMPTS)} streams"
    old_pid = _pids(cluster)[name]
    os.kill(old_pid, signal.SIGKILL)
    killed_at = time.monotonic()

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        rests = list(pool.map(list, streams))
    for prompt, token_ids, rest, want in zip(PROMPTS, received, rests, expected):
        assert rest[-1].HasField("final") and rest[-1].final.finish_reason == g.FINISH_REASON_LENGTH, prompt
        assert rest[-1].final.usage.completion_tokens == MAX_TOKENS, prompt
        assert token_ids + _token_ids(rest) == want, prompt
    frontend_log = cluster.serve.log_path.parent / "serve" / "frontend.log"
    assert "migrating it after" in frontend_log.read_text(errors="replace")

    # The supervisor brings the worker back; every pool is empty again and the frontend routes to it.
    _wait_until_back(cluster, name, address, old_pid, killed_at)
    _wait_until_settled(cluster, stub)
