"""The HTTP API's edges without a model: request conversion, error mapping, and a frontend not ready yet."""

from __future__ import annotations

import asyncio
import json

import pydantic
import pytest

from protos import generation_pb2
from services.common.errors import InvalidRequest, Overloaded, Unavailable
from services.frontend.app import FrontendApp, FrontendConfig
from services.frontend.openai.convert import chat_requests, choice_seed, completion_requests, public_param
from services.frontend.openai.errors import OpenAIError, from_exception, from_validation_error
from services.frontend.openai.protocol import ChatCompletionRequest, CompletionRequest
from services.frontend.openai.server import start_http_server
from tests.helpers.http import http_json


def _chat(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_choice_seeds_follow_seed_plus_index_and_wrap_into_int64():
    choices = chat_requests(_chat(n=3, seed=7, temperature=0.5), "chatcmpl-x")
    assert [c.index for c in choices] == [0, 1, 2]
    assert [c.request.sampling.seed for c in choices] == [7, 8, 9]
    assert [c.request.request_id for c in choices] == ["chatcmpl-x-0", "chatcmpl-x-1", "chatcmpl-x-2"]
    assert choice_seed(2**63 - 1, 1) == -(2**63)
    unseeded = chat_requests(_chat(n=2), "id")
    assert not any(c.request.sampling.HasField("seed") for c in unseeded)


def test_chat_messages_convert_to_the_grpc_chat_prompt():
    body = _chat(messages=[{"role": "developer", "content": "be brief"},
                           {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                 max_completion_tokens=5, logprobs=True, top_logprobs=2, stop="END")
    (choice,) = chat_requests(body, "id")
    messages = [(m.role, m.content) for m in choice.request.chat.messages]
    assert messages == [("system", "be brief"), ("user", "a\nb")]
    sampling = choice.request.sampling
    assert (sampling.max_tokens, sampling.logprobs, list(sampling.stop)) == (5, 2, ["END"])
    assert not sampling.HasField("temperature")  # unset: the frontend's default applies


def test_completion_batches_number_choices_prompt_major():
    body = CompletionRequest.model_validate({"prompt": [[1, 2], [3]], "n": 2})
    choices = completion_requests(body, "cmpl-x")
    assert [(c.index, c.prompt_index) for c in choices] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert list(choices[2].request.token_ids.ids) == [3]
    assert choices[0].request.sampling.max_tokens == 16  # OpenAI's completions default
    text = completion_requests(CompletionRequest.model_validate({"prompt": "x", "max_tokens": 3}), "c")
    assert text[0].request.text == "x" and text[0].request.sampling.max_tokens == 3


@pytest.mark.parametrize(
    "field, body, param",
    [
        ("sampling.temperature", _chat(), "temperature"),
        ("sampling.max_tokens", _chat(max_completion_tokens=0), "max_completion_tokens"),
        ("sampling.logprobs", _chat(logprobs=True, top_logprobs=99), "top_logprobs"),
        ("chat.messages[1].role", _chat(), "messages[1].role"),
        ("chat.messages", _chat(), "messages"),
        ("text", CompletionRequest.model_validate({"prompt": "x"}), "prompt"),
        ("token_ids.ids[3]", CompletionRequest.model_validate({"prompt": [[1], [2]]}), "prompt[1][3]"),
    ],
)
def test_frontend_fields_map_to_openai_params(field, body, param):
    assert public_param(field, body, prompt_index=1) == param
    error = from_exception(InvalidRequest(field, "is wrong"), lambda f: public_param(f, body, 1))
    assert (error.status, error.param, error.message) == (400, param, f"{param}: is wrong")


def test_statuses_of_service_errors():
    assert from_exception(Overloaded("full")).status == 429
    assert from_exception(Unavailable("no worker")).status == 503
    assert from_exception(RuntimeError("bug")).status == 500


@pytest.mark.parametrize(
    "raw, param, words",
    [
        ({"messages": [], "logprob": True}, "logprob", "unrecognized"),
        ({"messages": [], "n": 0}, "n", ">= 1"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "valid"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content[0].type", "text"),
        ({"messages": [], "top_logprobs": 2}, "top_logprobs", "requires logprobs"),
        ({"messages": [], "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ],
)
def test_request_shape_errors_name_the_parameter(raw, param, words):
    with pytest.raises(pydantic.ValidationError) as raised:
        ChatCompletionRequest.model_validate(raw)
    error = from_validation_error(raised.value)
    assert error.status == 400 and error.param.startswith(param) and words in error.message


def _get(url: str) -> tuple[int, dict]:
    return http_json(url, timeout=10)


def _post(url: str, body: dict) -> tuple[int, dict]:
    return http_json(url, json.dumps(body).encode(), timeout=10)


def test_not_ready_frontend_answers_503_in_openai_error_bodies(tokenizer):
    async def run() -> list[tuple[int, dict]]:
        # Workers that never answer: the router never becomes ready.
        config = FrontendConfig(prefill_addresses=["127.0.0.1:9"], decode_addresses=["127.0.0.1:9"])
        app = FrontendApp(config, tokenizer, "tiny")
        http = await start_http_server(app, "127.0.0.1", 0)
        base = f"http://127.0.0.1:{http.port}"
        try:
            chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
            return [
                await asyncio.to_thread(_get, f"{base}/health"),
                await asyncio.to_thread(_get, f"{base}/v1/models"),
                await asyncio.to_thread(_post, f"{base}/v1/chat/completions", chat),
                await asyncio.to_thread(_post, f"{base}/v1/chat/completions", {**chat, "model": "other"}),
                await asyncio.to_thread(_get, f"{base}/v1/nothing-here"),
            ]
        finally:
            await http.stop()
            await app.close()

    health, models, chat, other_model, missing = asyncio.run(run())
    assert [health[0], models[0], chat[0]] == [503, 503, 503]
    assert all(set(body["error"]) == {"message", "type", "param", "code"} for _, body in (health, models, chat))
    assert other_model[0] == 404 and other_model[1]["error"]["param"] == "model"
    assert missing[0] == 404 and "error" in missing[1]


def test_values_beyond_the_proto_range_are_rejected_by_name():
    with pytest.raises(OpenAIError) as raised:
        chat_requests(_chat(max_completion_tokens=2**40), "id")
    assert raised.value.status == 400 and raised.value.param == "max_completion_tokens"
    with pytest.raises(OpenAIError) as raised:
        completion_requests(CompletionRequest.model_validate({"prompt": [2**40]}), "id")
    assert raised.value.status == 400 and raised.value.param == "prompt"
