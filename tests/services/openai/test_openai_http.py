"""The OpenAI-compatible HTTP API against a real system (`tandem serve` on CPU), with the official client."""

from __future__ import annotations

import asyncio
import time

import grpc
import openai
import pytest

from common.model.registry import resolve_model
from common.tokenizer import apply_chat_template, load_tokenizer
from protos import generation_pb2, generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.helpers.http import http_call, http_json

pytestmark = pytest.mark.slow

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a long story about a dragon."}]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model(None).folder)


@pytest.fixture(scope="module")
def client(tandem_system) -> openai.OpenAI:
    return openai.OpenAI(base_url=tandem_system.http_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def test_models_chat_and_usage(client, model, tokenizer, tandem_system):
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    response = client.chat.completions.create(model=model, messages=FRANCE, temperature=0, max_tokens=24)
    choice = response.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"  # the answer ends with EOS well before 24 tokens
    assert response.usage.prompt_tokens == len(apply_chat_template(tokenizer, FRANCE))
    # EOS is generated (and counted) but has no text
    num_text_tokens = len(tokenizer.encode(choice.message.content, add_special_tokens=False))
    assert response.usage.completion_tokens == num_text_tokens + 1
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    status, body = http_call(tandem_system.http_url.removesuffix("/v1") + "/health")
    assert status == 200
    status, body = http_call(tandem_system.http_url.removesuffix("/v1") + "/metrics")
    assert status == 200 and b"tandem:time_to_first_token_seconds_count" in body


def test_stream_matches_non_stream_and_finish_reasons(client, model):
    kwargs = dict(model=model, messages=STORY, temperature=0, max_tokens=8)
    full = client.chat.completions.create(**kwargs)
    assert full.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    # a stop string from the middle of the text ends it there and is not returned
    words = full.choices[0].message.content.split()
    stop = " " + words[len(words) // 2]
    cut = client.chat.completions.create(**kwargs, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full.choices[0].message.content.split(stop)[0]


def test_include_usage_sends_a_last_usage_chunk(client, model):
    chunks = list(client.completions.create(model=model, prompt="The capital of France is", temperature=0,
                                            max_tokens=3, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.completion_tokens == 3
    assert chunks[-2].choices[0].finish_reason == "length"
    # vLLM's continuous_usage_stats: every chunk carries the usage so far
    chunks = list(client.completions.create(
        model=model, prompt="The capital of France is", temperature=0, max_tokens=3, stream=True,
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    final_usage = chunks[-1].usage
    counts = [c.usage.completion_tokens for c in chunks]  # tokens that arrived together share a chunk
    assert counts[0] == 1 and counts[-3:] == [3, 3, 3] and counts == sorted(counts)
    assert len(counts) == len(set(counts[:-2])) + 2  # each text chunk adds tokens; then finish, usage
    assert {c.usage.prompt_tokens for c in chunks} == {final_usage.prompt_tokens}


def test_n_choices_with_seed_are_reproducible(client, model):
    kwargs = dict(model=model, messages=STORY, temperature=1.0, max_tokens=6, seed=1234)
    first = client.chat.completions.create(**kwargs, n=2)
    again = client.chat.completions.create(**kwargs, n=2)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    # the documented scheme: choice i is sampled with seed + i
    second_alone = client.chat.completions.create(**{**kwargs, "seed": 1235})
    assert second_alone.choices[0].message.content == first.choices[1].message.content
    assert first.usage.completion_tokens == 12 and first.usage.prompt_tokens == second_alone.usage.prompt_tokens


def test_top_logprobs_match_the_grpc_api(client, model, tandem_system):
    response = client.chat.completions.create(model=model, messages=FRANCE, temperature=0, max_tokens=5,
                                              logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens == 5
    assert all(len(e.top_logprobs) == 3 for e in entries)
    request = generation_pb2.GenerateRequest(
        chat=generation_pb2.ChatMessages(messages=[generation_pb2.ChatMessage(**m) for m in FRANCE]),
        sampling=generation_pb2.SamplingParams(temperature=0, max_tokens=5, logprobs=3),
    )
    with grpc.insecure_channel(tandem_system.grpc_address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        grpc_logprobs = [lp for r in stub.Generate(request, timeout=60) if r.HasField("chunk")
                         for lp in r.chunk.logprobs]
    assert len(grpc_logprobs) == len(entries)
    for entry, expected in zip(entries, grpc_logprobs):
        assert entry.logprob == pytest.approx(expected.logprob, abs=1e-5)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx([t.logprob for t in expected.top], abs=1e-5)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob


def test_completions_batch_of_token_id_prompts(client, model, tokenizer):
    prompts = [tokenizer.encode("The capital of France is"), tokenizer.encode("One, two, three,")]
    response = client.completions.create(model=model, prompt=prompts, temperature=0, max_tokens=2, logprobs=1)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.prompt_tokens == sum(len(p) for p in prompts)
    for choice in response.choices:
        assert len(choice.logprobs.tokens) == 2 and "".join(choice.logprobs.tokens) == choice.text


@pytest.mark.parametrize(
    "kwargs, error, named",
    [
        ({"temperature": -1}, openai.BadRequestError, "temperature"),
        ({"top_p": 0}, openai.BadRequestError, "top_p"),
        ({"max_tokens": 0}, openai.BadRequestError, "max_tokens"),
        ({"messages": []}, openai.BadRequestError, "messages"),
        ({"extra_body": {"best_of": 2}}, openai.BadRequestError, "best_of"),
        ({"model": "no-such-model"}, openai.NotFoundError, "no-such-model"),
    ],
)
def test_invalid_requests_name_the_problem(client, model, kwargs, error, named):
    request = {"model": model, "messages": FRANCE, "max_tokens": 2, **kwargs}
    with pytest.raises(error) as raised:
        client.chat.completions.create(**request)
    assert named in raised.value.body["message"]
    if error is openai.BadRequestError:
        assert raised.value.body["param"] == named


def test_malformed_json_then_server_stays_healthy(client, model, tandem_system):
    status, body = http_json(tandem_system.http_url + "/chat/completions", b'{"model": "x", "messages": [', timeout=60)
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = http_json(tandem_system.http_url + "/completions", b'[1, 2]', timeout=60)
    assert status == 400 and "JSON object" in body["error"]["message"]
    response = client.chat.completions.create(model=model, messages=FRANCE, temperature=0, max_tokens=2)
    assert response.usage.completion_tokens == 2


def _worker_stats(tandem_system) -> list[worker_pb2.WorkerStats]:
    stats = []
    for addresses, stub_type in ((tandem_system.prefill_addresses, worker_pb2_grpc.PrefillWorkerStub),
                                 (tandem_system.decode_addresses, worker_pb2_grpc.DecodeWorkerStub)):
        for address in addresses:
            with grpc.insecure_channel(address) as channel:
                stats.append(stub_type(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=10))
    return stats


def test_concurrent_streams_and_a_disconnect_frees_every_block(model, tandem_system):
    async def run_all() -> list[str]:
        async with openai.AsyncOpenAI(base_url=tandem_system.http_url, api_key="unused", max_retries=0,
                                      timeout=180) as aclient:
            async def one(i: int) -> str:
                stream = await aclient.completions.create(model=model, prompt=f"Count from {i}:", max_tokens=4,
                                                          temperature=0, stream=True)
                chunks = [chunk async for chunk in stream]
                assert chunks[-1].choices[0].finish_reason == "length"
                return "".join(c.choices[0].text for c in chunks)

            return await asyncio.gather(*(one(i) for i in range(16)))

    assert len(asyncio.run(run_all())) == 16
    client = openai.OpenAI(base_url=tandem_system.http_url, api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(model=model, messages=STORY, max_tokens=400, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    for index, _chunk in enumerate(stream):
        if index == 3:
            break
    assert any(s.num_total_blocks - s.num_free_blocks > 0 for s in _worker_stats(tandem_system))
    stream.close()
    deadline = time.monotonic() + 20
    while True:
        stats = _worker_stats(tandem_system)
        if all(s.num_free_blocks == s.num_total_blocks and s.num_running == 0 for s in stats):
            break
        assert time.monotonic() < deadline, f"KV still held after the client left: {stats}"
        time.sleep(0.2)
