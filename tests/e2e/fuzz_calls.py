"""Sends the calls of tests/e2e/fuzz_strategies.py and judges each answer (an `Outcome`; `problem` set
when the answer breaks a property: a status the call must never get, a hang, a malformed stream)."""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import grpc

from protos import generation_pb2 as g
from protos import worker_pb2 as w
from protos import worker_pb2_grpc
from tests.e2e.fuzz_strategies import MAX_MODEL_LEN, GrpcCall, HttpCall, WorkerCall

HANG_SLACK_SECONDS = 15.0  # a call may end this much after its deadline (2 shared cores)
HTTP_TIMEOUT_SECONDS = 60.0
NEVER = {"INTERNAL", "UNKNOWN", "DATA_LOSS", "UNIMPLEMENTED"}
_STATUS_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass
class System:
    frontend: str  # host:port
    http: str  # http://host:port
    prefill: str
    decode: str
    log_dir: Path


@dataclass
class Outcome:
    kind: str  # what was called, e.g. "generate", "raw", "POST /v1/completions", "decode"
    status: str  # gRPC status name, HTTP status, or "hang"
    problem: str = ""  # empty: every property held
    call_repr: str = ""
    seconds: float = 0.0  # the call's wall time


def token_ids(responses) -> list[int]:
    return [t for response in responses if response.HasField("chunk") for t in response.chunk.token_ids]


def _judge(kind: str, status: str, allowed: set[str], elapsed: float, deadline: float, call, problem: str = "",
           details: str = ""):
    if not problem and status not in allowed:
        problem = f"status {status} after {elapsed:.2f}s: {details!r} (allowed here: {sorted(allowed)})"
    if not problem and elapsed > deadline + HANG_SLACK_SECONDS:
        problem = f"took {elapsed:.1f}s under a {deadline:.3g}s deadline"
    return Outcome(kind, status, problem, repr(call) if problem else "", elapsed)


# ---- frontend gRPC -------------------------------------------------------------------------------


def _check_generate_stream(request: g.GenerateRequest, responses: list[g.GenerateResponse]) -> str:
    """'' when the stream is chunks then exactly one final, within the request's limits."""
    finals = [i for i, r in enumerate(responses) if r.HasField("final")]
    if finals != [len(responses) - 1]:
        return f"final messages at {finals} of {len(responses)}"
    usage = responses[-1].final.usage
    if usage.prompt_tokens + usage.completion_tokens > MAX_MODEL_LEN:
        return f"usage {usage} is past max_model_len {MAX_MODEL_LEN}"
    if request.sampling.HasField("max_tokens") and usage.completion_tokens > request.sampling.max_tokens:
        return f"{usage.completion_tokens} tokens for max_tokens {request.sampling.max_tokens}"
    if len(token_ids(responses)) > usage.completion_tokens:
        return f"{len(token_ids(responses))} token ids sent, usage says {usage.completion_tokens}"
    for response in responses[:-1]:
        chunk = response.chunk
        if request.sampling.HasField("logprobs") and len(chunk.logprobs) != len(chunk.token_ids):
            return f"{len(chunk.logprobs)} logprobs for {len(chunk.token_ids)} tokens"
    return ""


def run_grpc_call(channel: grpc.Channel, call: GrpcCall, batch: list[GrpcCall]) -> Outcome:
    aborted_ids = {c.abort_id for c in batch if c.kind == "abort"}
    started = time.monotonic()
    status, problem, allowed, details = "OK", "", {"OK"}, ""
    try:
        if call.kind == "abort":
            channel.unary_unary("/tandem.v1.Generation/Abort", g.AbortRequest.SerializeToString,
                                g.AbortResponse.FromString)(g.AbortRequest(request_id=call.abort_id), timeout=60)
        elif call.kind == "model_info":
            channel.unary_unary("/tandem.v1.Generation/GetModelInfo", g.GetModelInfoRequest.SerializeToString,
                                g.ModelInfo.FromString)(g.GetModelInfoRequest(), timeout=60)
        else:
            allowed |= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
            is_raw = call.kind == "raw"
            serialize = None if is_raw else g.GenerateRequest.SerializeToString
            stream = channel.unary_stream("/tandem.v1.Generation/Generate", serialize, g.GenerateResponse.FromString)(
                call.payload if is_raw else call.request, timeout=call.deadline_seconds)
            if call.deadline_seconds < 30:
                allowed.add("DEADLINE_EXCEEDED")
            if call.cancel_after is not None or (not is_raw and call.request.request_id in aborted_ids):
                allowed.add("CANCELLED")
            responses = []
            for response in stream:
                responses.append(response)
                if len(responses) == call.cancel_after:
                    stream.cancel()
            if not is_raw:
                problem = _check_generate_stream(call.request, responses)
    except grpc.RpcError as error:
        status, details = error.code().name, error.details() or ""
        if status in NEVER:
            problem = f"{status}: {details}"
    return _judge(call.kind, status, allowed, time.monotonic() - started, call.deadline_seconds,
                  {"call": call, "its batch": batch}, problem, details)


# ---- frontend HTTP -------------------------------------------------------------------------------


def _check_http_body(call: HttpCall, status: int, body: bytes) -> str:
    if status != 200 or call.method != "POST":
        return ""
    if body.startswith(b"data:"):
        events = [line[5:].strip() for line in body.split(b"\n") if line.startswith(b"data:")]
        if not events or events[-1] != b"[DONE]":
            return "a stream that does not end with [DONE]"
        for event in events[:-1]:
            error = json.loads(event).get("error")
            if error and (error.get("type") in ("internal_error", "cancelled_error") or error.get("code") in
                          ("internal", "unknown")):
                return f"in-band error {error}"
        return ""
    if "choices" not in json.loads(body):
        return f"a 200 without choices: {body[:300]!r}"
    return ""


def run_http_call(base_url: str, call: HttpCall) -> Outcome:
    url = urlsplit(base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=HTTP_TIMEOUT_SECONDS)
    kind = f"{call.method} {call.path.split('/v1/models/')[0]}"
    started = time.monotonic()
    try:
        headers = {"Content-Type": "application/json", **call.headers}
        connection.request(call.method, call.path, body=call.body, headers=headers)
        response = connection.getresponse()
        body = response.read()
        status = response.status
    except (socket.timeout, TimeoutError):
        return Outcome(kind, "hang", f"no answer within {HTTP_TIMEOUT_SECONDS}s", repr(call)[:2000])
    except (ConnectionError, http.client.HTTPException) as error:  # e.g. 413 answered before the body was read
        if call.body is not None and len(call.body) > 4 * 1024 * 1024:
            return Outcome(kind, "closed-oversized")
        return Outcome(kind, "closed", f"connection error {error!r}", repr(call)[:2000])
    finally:
        connection.close()
    problem = f"HTTP {status}: {body[:500]!r}" if status >= 500 else _check_http_body(call, status, body)
    return Outcome(kind, str(status), problem, repr(call)[:2000] if problem else "", time.monotonic() - started)


# ---- workers -------------------------------------------------------------------------------------


class WorkerChannels:
    def __init__(self, system: System):
        self.prefill_channel = grpc.insecure_channel(system.prefill)
        self.decode_channel = grpc.insecure_channel(system.decode)
        self.prefill = worker_pb2_grpc.PrefillWorkerStub(self.prefill_channel)
        self.decode = worker_pb2_grpc.DecodeWorkerStub(self.decode_channel)

    def __enter__(self) -> "WorkerChannels":
        return self

    def __exit__(self, *exc_info) -> None:
        self.prefill_channel.close()
        self.decode_channel.close()


# What a worker may answer (undecodable bytes included: INVALID_ARGUMENT, services/common/tolerant_decoding.py).
WORKER_ALLOWED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION"}


def _decode_request(channels: WorkerChannels, call: WorkerCall) -> w.DecodeRequest | None:
    """A real hand-off's DecodeRequest (one field tampered with) or one with a made-up handle; None when
    token #1 already ended the request (no KV held)."""
    prefill = call.prefill
    answer = channels.prefill.Prefill(prefill, timeout=60)
    if not answer.HasField("kv_handle"):
        return None
    request = w.DecodeRequest(request_id=prefill.request_id, prompt_token_ids=prefill.prompt_token_ids,
                              first_token_id=answer.first_token_id, sampling=prefill.sampling,
                              kv_handle=call.fake_handle or answer.kv_handle)
    for name, value in call.tamper.items():
        if name == "prompt_token_ids":
            del request.prompt_token_ids[:]
            request.prompt_token_ids.extend(value)
        elif name == "sampling":
            request.sampling.CopyFrom(value)
        else:
            setattr(request, name, value)
    return request


def _stream_messages(call: WorkerCall, request: w.DecodeRequest):
    for _ in range(call.num_stream_requests):
        yield w.DecodeStreamRequest(decode=request)
        if call.abort_first:
            yield w.DecodeStreamRequest(abort=w.AbortRequest(request_id=request.request_id))


def _run_decode(channels: WorkerChannels, call: WorkerCall, request: w.DecodeRequest) -> str:
    """Runs a Decode or DecodeStream to its end; '' or the problem (a request-scoped INTERNAL / UNKNOWN)."""
    if call.kind == "decode":
        list(channels.decode.Decode(request, timeout=call.deadline_seconds))
        return ""
    for message in channels.decode.DecodeStream(_stream_messages(call, request), timeout=call.deadline_seconds):
        for update in message.updates:
            name = _STATUS_NAMES.get(update.error.code, str(update.error.code))
            if update.HasField("error") and name in NEVER:
                return f"request error {name}: {update.error.message}"
    return ""


def _cleanup(channels: WorkerChannels, request_id: str) -> None:
    """What the frontend does when a request ends: abort it on both workers."""
    for stub in (channels.prefill, channels.decode):
        try:
            stub.Abort(w.AbortRequest(request_id=request_id), timeout=30)
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.INVALID_ARGUMENT:  # an id no worker accepts
                raise


def _call_worker(channels: WorkerChannels, call: WorkerCall) -> tuple[set[str], str]:
    """(statuses this call may also get, problem) of one call; raises grpc.RpcError with its status."""
    if call.kind == "prefill":
        answer = channels.prefill.Prefill(call.prefill, timeout=60)
        if answer.HasField("kv_handle") and not call.abort_first:  # else its lease runs out
            channels.prefill.Abort(w.AbortRequest(request_id=call.prefill.request_id), timeout=30)
        return set(), ""
    if call.kind in ("decode", "stream"):
        request = _decode_request(channels, call)
        try:
            return ({"DEADLINE_EXCEEDED"} if call.deadline_seconds < 30 else set(),
                    "" if request is None else _run_decode(channels, call, request))
        finally:
            _cleanup(channels, call.prefill.request_id)
            if request is not None and request.request_id != call.prefill.request_id:
                _cleanup(channels, request.request_id)
    if call.kind == "abort":
        for stub in (channels.prefill, channels.decode):
            stub.Abort(w.AbortRequest(request_id=call.abort_id), timeout=30)
        return set(), ""
    if call.kind == "stats":
        for stub in (channels.prefill, channels.decode):
            stub.GetStats(w.GetStatsRequest(), timeout=30)
        return set(), ""
    channel = channels.prefill_channel if "Prefill" in call.raw_method else channels.decode_channel
    if call.raw_method.endswith("/DecodeStream"):  # a garbage message on the stream, after a valid one
        messages = [w.DecodeStreamRequest(abort=w.AbortRequest(request_id="x")).SerializeToString(), call.payload]
        list(channel.stream_stream(call.raw_method)(iter(messages), timeout=30))
    elif call.raw_method.endswith("/Decode"):
        list(channel.unary_stream(call.raw_method)(call.payload, timeout=30))
    else:
        channel.unary_unary(call.raw_method)(call.payload, timeout=30)
    return set(), ""


def run_worker_call(channels: WorkerChannels, call: WorkerCall) -> list[Outcome]:
    started = time.monotonic()
    status, problem, allowed, details = "OK", "", set(WORKER_ALLOWED), ""
    try:
        more, problem = _call_worker(channels, call)
        allowed |= more
    except grpc.RpcError as error:
        status, details = error.code().name, error.details() or ""
        if call.deadline_seconds < 30:
            allowed.add("DEADLINE_EXCEEDED")
        if status in NEVER:
            problem = f"{status}: {error.details()}"
    kind = call.raw_method.rsplit("/", 2)[-2:] if call.kind == "raw" else call.kind
    kind = f"raw {'/'.join(kind)}" if call.kind == "raw" else kind
    return [_judge(kind, status, allowed, time.monotonic() - started, call.deadline_seconds, call, problem, details)]
