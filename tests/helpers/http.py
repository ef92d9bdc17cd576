"""Plain HTTP calls for tests that check status codes and error bodies (urllib raises on 4xx/5xx)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def http_call(url: str, data: bytes | None = None, timeout: float = 30.0) -> tuple[int, bytes]:
    """(status, body) of a GET, or of a POST of JSON `data`; an error status is returned, not raised."""
    headers = {} if data is None else {"Content-Type": "application/json"}
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_json(url: str, data: bytes | None = None, timeout: float = 30.0) -> tuple[int, dict]:
    """`http_call` with the body parsed as JSON."""
    status, body = http_call(url, data, timeout)
    return status, json.loads(body)
