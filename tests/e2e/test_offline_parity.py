"""Greedy outputs through frontend -> prefill -> decode equal `tandem offline` on the same prompts, with
the offline engine in mixed steps (decodes beside prompt chunks, also under a tiny step budget) or a
step of prefill or decode at a time."""

import json
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from protos import generation_pb2 as g
from tests.e2e.cluster import ENGINE_ARGS, REPO_ROOT, TANDEM, service_env

MAX_TOKENS = 24
PROMPTS = [
    {"prompt": "The three primary colors are"},
    {"prompt": "def fibonacci(n):"},
    {"prompt": "Water boils at a temperature of"},
    {"prompt": "A haiku about autumn leaves:"},
    {"messages": [{"role": "user", "content": "What is the capital of France?"}]},
    {"messages": [{"role": "user", "content": "Name two planets in the solar system."}]},
    {"messages": [{"role": "system", "content": "You answer briefly."},
                  {"role": "user", "content": "Why is the sky blue?"}]},
    {"messages": [{"role": "user", "content": "Translate 'good morning' into Spanish."}]},
]


def _request(prompt: dict) -> g.GenerateRequest:
    sampling = g.SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    if "prompt" in prompt:
        return g.GenerateRequest(text=prompt["prompt"], sampling=sampling)
    messages = [g.ChatMessage(**m) for m in prompt["messages"]]
    return g.GenerateRequest(chat=g.ChatMessages(messages=messages), sampling=sampling)


def _served_token_ids(stub, prompt: dict) -> tuple[list[int], str]:
    responses = list(stub.Generate(_request(prompt), timeout=300))
    token_ids = [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]
    return token_ids, "".join(r.chunk.text for r in responses if r.HasField("chunk"))


OFFLINE_SCHEDULING = {
    "mixed": [],
    # 8 prompts of ~10-40 tokens at 16 tokens a step: chunks of them ride beside the others' decodes
    "mixed-small-budget": ["--max-num-batched-tokens", "16", "--max-num-seqs", "8"],
    "step-at-a-time": ["--no-enable-chunked-prefill"],
}


@pytest.mark.parametrize("scheduling", sorted(OFFLINE_SCHEDULING))
def test_concurrent_greedy_requests_equal_offline(cluster, stub, tmp_path, scheduling):
    input_path, output_path = tmp_path / "prompts.jsonl", tmp_path / "out.jsonl"
    input_path.write_text("".join(json.dumps({**p, "max_tokens": MAX_TOKENS, "temperature": 0}) + "\n" for p in PROMPTS))
    offline = subprocess.Popen([*TANDEM, "offline", "--input", str(input_path), "--output", str(output_path),
                                *ENGINE_ARGS, *OFFLINE_SCHEDULING[scheduling]], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env=service_env(), cwd=REPO_ROOT)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        served = list(pool.map(lambda p: _served_token_ids(stub, p), PROMPTS))
    log, _ = offline.communicate(timeout=600)
    assert offline.returncode == 0, log
    expected = [json.loads(line) for line in output_path.read_text().splitlines()]
    for (token_ids, text), reference in zip(served, expected):
        assert token_ids == reference["token_ids"]
        assert text == reference["text"]
