"""Multi-turn chats through real services with prefix caching on (the default) give the same greedy
tokens as `tandem offline --no-enable-prefix-caching`, and leave every worker's pool free."""

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

from protos import generation_pb2 as g
from tests.e2e.cluster import ENGINE_ARGS, REPO_ROOT, TANDEM, service_env, wait_for_empty_pools

MAX_TOKENS = 16
SYSTEM = {"role": "system", "content": "You are a concise assistant. Answer in one short sentence, "
                                       "and never repeat the question back to the user."}
QUESTIONS = [
    ("What is the capital of France?", "And of Italy?"),
    ("Name a planet in the solar system.", "How far is it from the sun?"),
    ("What colour is the sky?", "Why is that?"),
]


def _chat(stub, messages: list[dict]) -> tuple[list[int], str]:
    request = g.GenerateRequest(chat=g.ChatMessages(messages=[g.ChatMessage(**m) for m in messages]),
                                sampling=g.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    responses = list(stub.Generate(request, timeout=300))
    token_ids = [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]
    return token_ids, "".join(r.chunk.text for r in responses if r.HasField("chunk"))


def _conversation(stub, first: str, second: str) -> list[tuple[list[dict], list[int]]]:
    """Two turns: the second sends the first turn's answer back, as a chat client does."""
    turn1 = [SYSTEM, {"role": "user", "content": first}]
    tokens1, text1 = _chat(stub, turn1)
    turn2 = turn1 + [{"role": "assistant", "content": text1}, {"role": "user", "content": second}]
    tokens2, _ = _chat(stub, turn2)
    return [(turn1, tokens1), (turn2, tokens2)]


def test_multi_turn_chats_with_caching_equal_offline_without_it(cluster, stub, tmp_path):
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        conversations = list(pool.map(lambda q: _conversation(stub, *q), QUESTIONS))
    turns = [turn for conversation in conversations for turn in conversation]
    input_path, output_path = tmp_path / "turns.jsonl", tmp_path / "out.jsonl"
    input_path.write_text("".join(json.dumps({"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0})
                                  + "\n" for messages, _ in turns))
    offline = subprocess.run([*TANDEM, "offline", "--input", str(input_path), "--output", str(output_path),
                              "--no-enable-prefix-caching", *ENGINE_ARGS], capture_output=True, text=True,
                             env=service_env(), cwd=REPO_ROOT, timeout=600)
    assert offline.returncode == 0, offline.stdout + offline.stderr
    expected = [json.loads(line)["token_ids"] for line in output_path.read_text().splitlines()]
    assert [tokens for _, tokens in turns] == expected
    stats = wait_for_empty_pools(cluster.main_workers)
    for address, worker in stats.items():
        assert worker.num_free_blocks == worker.num_total_blocks and worker.num_held_leases == 0, address
