"""The HTTP API against hostile and oversized requests: each is a 400 (413 for the body, 429 when full)
in OpenAI's error body, never a 500; the API key guards everything but /health; no /docs."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from services.frontend.openai.server import start_http_server

CHAT = "/v1/chat/completions"


def _call(url: str, data: bytes | None = None, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body or {}, headers); error statuses are returned, not raised."""
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            status, raw, response_headers = response.status, response.read(), response.headers
    except urllib.error.HTTPError as exc:
        status, raw, response_headers = exc.code, exc.read(), exc.headers
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    return status, body, dict(response_headers)


@pytest.fixture
def serve(make_system):
    """serve(**FrontendConfig overrides) -> the base URL of a system's HTTP API."""
    started = []

    def start(**overrides) -> str:
        system = make_system(frontend_overrides=overrides)
        http = system.run(start_http_server(system.app, "127.0.0.1", 0))
        http.mark_ready()
        started.append((system, http))
        return f"http://127.0.0.1:{http.port}"

    yield start
    for system, http in started:
        system.run(http.stop(0))


def _chat(content: str = "hi", **fields) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": 2, **fields}


@pytest.mark.parametrize("raw, words", [
    (b'{"messages": [{"role": "user", "content": "x\\udfff"}]}', "surrogate"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 5000 + b"}", "out of range"),
    (b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": ' + b"9" * 4000 + b"}", "max_tokens"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "n": ' + b"9" * 4000 + b"}", "n:"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_k": -' + b"9" * 4000 + b"}", "top_k"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": 1e400}', "temperature"),
])
def test_hostile_json_is_400_with_a_clear_message(serve, raw, words):
    status, body, _ = _call(serve() + CHAT, raw)
    assert status == 400, body
    assert words in body["error"]["message"], body


def test_size_limits_are_refused_before_tokenization(serve):
    base = serve(max_request_bytes=4000, max_prompt_chars=1000, max_n=2)
    status, body, _ = _call(base + CHAT, json.dumps(_chat("x" * 5000)).encode())
    assert status == 413 and "4000" in body["error"]["message"], body
    status, body, _ = _call(base + CHAT, json.dumps(_chat("x" * 1001)).encode())
    assert status == 400 and body["error"]["param"] == "messages", body
    status, body, _ = _call(base + "/v1/completions", json.dumps({"prompt": "y" * 1001}).encode())
    assert status == 400 and body["error"]["param"] == "prompt", body
    status, body, _ = _call(base + CHAT, json.dumps(_chat(n=3)).encode())
    assert status == 400 and body["error"]["param"] == "n", body
    status, body, _ = _call(base + CHAT, json.dumps(_chat(max_tokens=10_000)).encode())
    assert status == 400 and body["error"]["param"] == "max_tokens", body
    status, body, _ = _call(base + CHAT, json.dumps(_chat(stop=["s" * 2000])).encode())
    assert status == 400 and body["error"]["param"] == "stop[0]", body
    status, body, _ = _call(base + CHAT, json.dumps(_chat()).encode())
    assert status == 200, body


def test_a_request_takes_a_slot_per_choice_and_overload_is_429_with_retry_after(serve):
    base = serve(max_num_requests=2)
    status, body, headers = _call(base + CHAT, json.dumps(_chat(n=3)).encode())
    assert status == 429 and body["error"]["type"] == "rate_limit_error", body
    assert headers["retry-after"] == "1"
    for stream in (False, True):  # the slots come back: a second request fits too
        status, body, _ = _call(base + CHAT, json.dumps(_chat(n=2, stream=stream)).encode())
        assert status == 200, body


def test_docs_are_off(serve):
    base = serve()
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert _call(base + path)[0] == 404, path


def test_api_key_is_required_everywhere_but_health(serve):
    base = serve(api_key="sesame")
    assert _call(base + "/health")[0] == 200
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}]:
        status, body, response_headers = _call(base + "/v1/models", headers=headers)
        assert status == 401 and body["error"]["type"] == "authentication_error", body
        assert response_headers["www-authenticate"] == "Bearer"
        assert _call(base + CHAT, json.dumps(_chat()).encode(), headers)[0] == 401
    key = {"Authorization": "Bearer sesame"}
    assert _call(base + "/v1/models", headers=key)[0] == 200
    status, body, _ = _call(base + CHAT, json.dumps(_chat()).encode(), key)
    assert status == 200, body
