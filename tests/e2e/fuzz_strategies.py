"""Hypothesis strategies for hostile requests (used by tests/e2e/test_fuzz.py).

    grpc_batches()     1-3 concurrent calls to tandem.v1.Generation: GenerateRequests with any field
                       at or past its limits, raw wire bytes (invalid UTF-8 in string fields, wrong
                       wire types, truncations, garbage), Aborts, duplicate request ids
    http_calls()       OpenAI HTTP calls: random JSON, typed bodies with wrong types and huge numbers,
                       raw bodies (deep nesting, NaN, lone surrogates, invalid UTF-8, oversized)
    worker_calls()     direct Prefill / Decode / DecodeStream / Abort / GetStats calls with random fields
                       (and raw bytes) to the workers' own ports

Each strategy mixes plausible requests (in range, so generation paths run) with hostile ones. Sizes
assume the fuzz system's tiny model: VOCAB_SIZE ids, MAX_MODEL_LEN tokens of context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from hypothesis import strategies as st

from protos import generation_pb2 as g
from protos import kv_layout_pb2
from protos import worker_pb2 as w

VOCAB_SIZE = 49152
MAX_MODEL_LEN = 256
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
DUPLICATE_IDS = ("dup-0", "dup-1")  # drawn often, so concurrent calls share ids

int32s = st.integers(INT32_MIN, INT32_MAX)
uint32s = st.integers(0, 2**32 - 1)
int64s = st.integers(INT64_MIN, INT64_MAX)
floats32 = st.floats(width=32)  # NaN, +-inf, -0.0, subnormals included


def edge_ints(low: int, high: int) -> st.SearchStrategy[int]:
    """Values around [low, high]'s edges, inside it, or anywhere in int32."""
    edges = [v for v in (low - 1, low, low + 1, high - 1, high, high + 1, 0, -1, INT32_MIN, INT32_MAX)
             if INT32_MIN <= v <= INT32_MAX]
    return st.one_of(st.sampled_from(edges), st.integers(low, high), int32s)


def long_texts() -> st.SearchStrategy[str]:
    """A repeated unit up to past the frontend's 1,000,000-character prompt limit."""
    units = st.sampled_from(["a", "hello ", "é", "🙂", " ", "\x00", "\n", "<|im_start|>"])
    sizes = st.sampled_from([0, 255, 1024, 5000, 100_000, 1_000_001])
    return st.builds(lambda unit, size: (unit * size)[:size], units, sizes)


texts = st.one_of(st.text(max_size=40), st.text(max_size=40), long_texts())
request_ids = st.one_of(st.sampled_from(DUPLICATE_IDS), st.text(max_size=20),
                        st.builds(lambda n: "x" * n, st.sampled_from([255, 256, 257, 10_000])))
token_lists = st.one_of(
    st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=32),
    st.lists(edge_ints(0, VOCAB_SIZE - 1), max_size=32),
    st.builds(lambda n, t: [t] * n, st.sampled_from([MAX_MODEL_LEN - 1, MAX_MODEL_LEN, 5000]),
              st.integers(0, VOCAB_SIZE - 1)),
)


# ---- tandem.v1.Generation ------------------------------------------------------------------------


def _optional(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def sampling_params(draw, hostile: bool) -> g.SamplingParams:
    """Every field maybe unset; `hostile` draws each from anywhere its type allows."""
    def pick(plausible, anything):
        return draw(_optional(st.one_of(plausible, anything) if hostile else plausible))

    values = {  # max_tokens unset (the server's default, up to the whole context) now and then: it is slow
        "max_tokens": draw(st.one_of(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8), _optional(
            edge_ints(1, MAX_MODEL_LEN) if hostile else st.integers(9, MAX_MODEL_LEN)))),
        "temperature": pick(st.floats(0, 2, width=32), floats32),
        "top_p": pick(st.floats(0.0625, 1, width=32), floats32),
        "top_k": pick(st.integers(-1, 50), int32s),
        "min_p": pick(st.floats(0, 1, width=32), floats32),
        "seed": pick(st.integers(0, 2**32), int64s),
        "repetition_penalty": pick(st.floats(0.5, 2, width=32), floats32),
        "frequency_penalty": pick(st.floats(-2, 2, width=32), floats32),
        "presence_penalty": pick(st.floats(-2, 2, width=32), floats32),
        "ignore_eos": draw(_optional(st.booleans())),
        "min_tokens": pick(st.integers(0, 4), edge_ints(0, MAX_MODEL_LEN)),
        "logprobs": pick(st.integers(0, 20), edge_ints(0, 20)),
    }
    stop = draw(st.lists(st.one_of(st.text(max_size=4), st.sampled_from(["", "a" * 1025, " ", "\n"])),
                         max_size=18 if hostile else 3))
    stop_token_ids = draw(st.lists(edge_ints(0, VOCAB_SIZE - 1) if hostile else st.integers(0, VOCAB_SIZE - 1),
                                   max_size=4))
    return g.SamplingParams(stop=stop, stop_token_ids=stop_token_ids,
                            **{k: v for k, v in values.items() if v is not None})


chat_roles = st.one_of(st.sampled_from(["system", "user", "assistant"]), st.text(max_size=8))
chat_messages = st.builds(g.ChatMessage, role=chat_roles, content=texts)


plausible_texts = st.builds(lambda head, tail: head + tail, st.sampled_from(["Hello", "The sea", "1 + 1 =", "Été"]),
                            st.text(max_size=20))
plausible_chats = st.lists(st.builds(g.ChatMessage, role=st.sampled_from(["system", "user", "assistant"]),
                                     content=plausible_texts), min_size=1, max_size=3)


@st.composite
def generate_requests(draw) -> g.GenerateRequest:
    """Half plausible (every field in range: generation runs), half hostile (any field anywhere)."""
    if draw(st.booleans()):
        request = g.GenerateRequest(sampling=draw(sampling_params(hostile=False)))
        request_id = draw(_optional(st.one_of(st.sampled_from(DUPLICATE_IDS),
                                              st.builds(lambda n: f"fuzz-{n}", st.integers(0, 10**9)))))
        if request_id is not None:
            request.request_id = request_id
        kind = draw(st.sampled_from(["text", "chat", "token_ids"]))
        if kind == "text":
            request.text = draw(plausible_texts)
        elif kind == "chat":
            request.chat.messages.extend(draw(plausible_chats))
        else:
            request.token_ids.ids.extend(draw(st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=32)))
        return request
    request = g.GenerateRequest()
    request_id = draw(_optional(request_ids))
    if request_id is not None:
        request.request_id = request_id
    kind = draw(st.sampled_from(["text", "chat", "token_ids", "none"]))
    if kind == "text":
        request.text = draw(texts)
    elif kind == "chat":
        request.chat.messages.extend(draw(st.lists(chat_messages, max_size=4)))
    elif kind == "token_ids":
        request.token_ids.ids.extend(draw(token_lists))
    if draw(st.booleans()):
        request.sampling.CopyFrom(draw(sampling_params(hostile=draw(st.booleans()))))
    return request


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def wire_field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) with any bytes, UTF-8 or not."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


invalid_utf8 = st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"a\x80b", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf"])


@st.composite
def raw_generate_payloads(draw) -> bytes:
    """Bytes on the wire that no protobuf client would send."""
    base = draw(generate_requests()).SerializeToString()
    bad = draw(invalid_utf8)
    variants = {
        "request_id": wire_field(1, bad),
        "text": wire_field(2, bad),
        "chat content": wire_field(3, wire_field(1, wire_field(1, b"user") + wire_field(2, bad))),
        "chat role": wire_field(3, wire_field(1, wire_field(1, bad))),
        "stop string": wire_field(5, wire_field(10, bad)),
        "text as a varint": _varint(2 << 3 | 0) + _varint(draw(st.integers(0, 2**64 - 1))),
        "length past the end": _varint(2 << 3 | 2) + _varint(draw(st.integers(1, 2**32))) + b"ab",
        "unknown field": _varint(draw(st.integers(6, 2**29 - 1)) << 3 | 0) + _varint(7),
        "packed ids of odd length": wire_field(4, wire_field(1, b"\xff\xff\xff")),
    }
    choice = draw(st.sampled_from([*variants, "truncated", "garbage"]))
    if choice == "truncated":
        return base[: draw(st.integers(0, max(len(base) - 1, 0)))]
    if choice == "garbage":
        return draw(st.binary(max_size=200))
    return base + variants[choice]


@dataclass
class GrpcCall:
    """One client call: a GenerateRequest, raw bytes for Generate, an Abort, or GetModelInfo."""

    kind: str  # "generate" | "raw" | "abort" | "model_info"
    request: g.GenerateRequest | None = None
    payload: bytes = b""
    abort_id: str = ""
    deadline_seconds: float = 60.0
    cancel_after: int | None = None  # cancel the stream after this many responses


short_deadlines = st.floats(0.001, 1.0)
deadlines = st.one_of(st.just(60.0), st.just(60.0), short_deadlines)


def grpc_calls() -> st.SearchStrategy[GrpcCall]:
    return st.one_of(
        st.builds(GrpcCall, kind=st.just("generate"), request=generate_requests(), deadline_seconds=deadlines,
                  cancel_after=_optional(st.integers(0, 3))),
        st.builds(GrpcCall, kind=st.just("generate"), request=generate_requests(), deadline_seconds=deadlines),
        st.builds(GrpcCall, kind=st.just("raw"), payload=raw_generate_payloads()),
        st.builds(GrpcCall, kind=st.just("abort"), abort_id=st.one_of(st.sampled_from(DUPLICATE_IDS), st.text())),
        st.builds(GrpcCall, kind=st.just("model_info")),
    )


def grpc_batches() -> st.SearchStrategy[list[GrpcCall]]:
    return st.lists(grpc_calls(), min_size=1, max_size=3)


# ---- OpenAI HTTP ---------------------------------------------------------------------------------

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-(10**30), 10**30),
                         st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda children: st.one_of(
    st.lists(children, max_size=4), st.dictionaries(st.text(max_size=8), children, max_size=4)), max_leaves=12)
COMMON_KEYS = ["model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
               "frequency_penalty", "stream", "stream_options", "user", "top_k", "min_p", "repetition_penalty",
               "ignore_eos", "min_tokens", "stop_token_ids"]
CHAT_KEYS = ["messages", "max_completion_tokens", "logprobs", "top_logprobs"]
COMPLETION_KEYS = ["prompt", "logprobs"]


def _plausible_values(key: str, is_chat: bool) -> st.SearchStrategy:
    plausible = {
        "max_tokens": st.integers(1, 8), "max_completion_tokens": st.integers(1, 8),
        "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1), "n": st.integers(1, 3),
        "stop": st.one_of(st.text(max_size=3), st.lists(st.text(max_size=3), max_size=3)),
        "seed": st.integers(0, 100), "stream": st.booleans(), "ignore_eos": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "logprobs": st.booleans() if is_chat else st.integers(0, 5), "top_logprobs": st.integers(0, 5),
        "prompt": st.one_of(plausible_texts, st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=8),
                            st.lists(plausible_texts, min_size=1, max_size=3), st.text(max_size=10)),
        "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                    "content": plausible_texts}), min_size=1, max_size=3),
        "min_tokens": st.integers(0, 3), "top_k": st.integers(-1, 10), "min_p": st.floats(0, 1),
    }
    return plausible.get(key, json_values)


@st.composite
def typed_bodies(draw, is_chat: bool) -> dict:
    """The endpoint's own keys (plus a stray one), each plausible or any JSON value at all."""
    keys = COMMON_KEYS + (CHAT_KEYS if is_chat else COMPLETION_KEYS)
    required = "messages" if is_chat else "prompt"
    chosen = draw(st.lists(st.sampled_from(keys + ["echo", "tools"]), max_size=6, unique=True))
    body = {}
    for key in [required, *chosen] if draw(st.integers(0, 9)) else chosen:
        hostile = draw(st.integers(0, 5)) == 0
        body[key] = draw(json_values if hostile else _plausible_values(key, is_chat))
    if "max_tokens" not in body and "max_completion_tokens" not in body:
        body["max_tokens"] = draw(st.integers(1, 8))  # keep most accepted requests short
    return body


raw_bodies = st.sampled_from([
    b"", b"{", b"null", b"[]", b"\"text\"", b"{}", b"\xff\xfe{}", b'{"prompt": "\xff"}',
    b'{"prompt": "a", "max_tokens": NaN}', b'{"prompt": "a", "temperature": Infinity}',
    b'{"prompt": "a", "max_tokens": ' + b"9" * 5000 + b"}", b'{"prompt": "a", "seed": 1e999}',
    b'{"prompt": "\\udfff"}', b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", b'{"prompt": "a", "stop": ' + b"[" * 5000 + b"}",
    b'{"prompt": "a", "max_tokens": 1, "max_tokens": -1}', b'{"prompt": "' + b"a" * 5_000_000 + b'"}',
])


@dataclass
class HttpCall:
    method: str
    path: str
    body: bytes | None
    headers: dict[str, str] = field(default_factory=dict)


def _json_bytes(value) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


def http_calls() -> st.SearchStrategy[HttpCall]:
    completions = st.builds(lambda body: HttpCall("POST", "/v1/completions", _json_bytes(body)), typed_bodies(False))
    chats = st.builds(lambda body: HttpCall("POST", "/v1/chat/completions", _json_bytes(body)), typed_bodies(True))
    paths = st.sampled_from(["/v1/completions", "/v1/chat/completions"])
    anything = st.builds(lambda path, body: HttpCall("POST", path, _json_bytes(body)), paths, json_values)
    raw = st.builds(lambda path, body: HttpCall("POST", path, body), paths, raw_bodies)
    odd = st.builds(HttpCall, st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
                    st.one_of(st.sampled_from(["/v1/models", "/health", "/metrics", "/v1/completions"]),
                              st.builds(lambda s: "/v1/models/" + s, st.text(alphabet="abc%/.-_", max_size=12))),
                    st.none())
    return st.one_of(completions, completions, chats, chats, anything, raw, odd)


# ---- workers' own ports --------------------------------------------------------------------------


@st.composite
def worker_sampling(draw) -> w.SamplingParams:
    hostile = draw(st.booleans())
    message = w.SamplingParams(max_tokens=draw(edge_ints(1, MAX_MODEL_LEN) if hostile else st.integers(1, 6)),
                               temperature=draw(floats32 if hostile else st.floats(0, 1, width=32)),
                               top_p=draw(floats32 if hostile else st.just(1.0)),
                               top_k=draw(int32s if hostile else st.just(-1)),
                               repetition_penalty=draw(floats32 if hostile else st.just(1.0)),
                               ignore_eos=draw(st.booleans()),
                               num_output_tokens_before=draw(edge_ints(0, 8) if hostile else st.just(0)))
    for name in ("min_p", "frequency_penalty", "presence_penalty"):
        if hostile and draw(st.booleans()):
            setattr(message, name, draw(floats32))
    if draw(st.booleans()):
        message.seed = draw(int64s)
    if draw(st.booleans()):
        message.logprobs = draw(edge_ints(0, 20))
    if hostile:
        message.min_tokens = draw(edge_ints(0, MAX_MODEL_LEN))
        message.stop_token_ids.extend(draw(st.lists(int32s, max_size=3)))
    return message


worker_request_ids = st.one_of(st.builds(lambda n: f"fuzz-{n}", st.integers(0, 10**9)), request_ids)
prefill_requests = st.builds(w.PrefillRequest, request_id=worker_request_ids, prompt_token_ids=token_lists,
                             sampling=worker_sampling())


@dataclass
class WorkerCall:
    """`kind`: prefill | decode | stream | abort | stats | raw. Decode calls use a fresh real hand-off
    (prefilled first) unless `fake_handle` is set; `tamper` changes one field of the real request."""

    kind: str
    prefill: w.PrefillRequest | None = None
    tamper: dict = field(default_factory=dict)
    fake_handle: w.KVHandle | None = None
    num_stream_requests: int = 1
    abort_first: bool = False
    abort_id: str = ""
    raw_method: str = ""
    payload: bytes = b""
    deadline_seconds: float = 60.0


kv_handles = st.builds(w.KVHandle, transfer_id=st.one_of(st.text(max_size=40), st.just("0" * 32)),
                       sender_address=st.one_of(st.text(max_size=20), st.just("127.0.0.1:1")),
                       num_tokens=int32s, num_blocks=int32s,
                       layout=st.builds(kv_layout_pb2.KVLayout, model_name=st.text(max_size=8), dtype=st.text(max_size=8),
                                        block_size=uint32s, num_layers=uint32s, num_kv_heads=uint32s,
                                        head_dim=uint32s))
tampers = st.one_of(st.just({}), st.fixed_dictionaries({"first_token_id": edge_ints(0, VOCAB_SIZE - 1)}),
                    st.fixed_dictionaries({"prompt_token_ids": token_lists}),
                    st.fixed_dictionaries({"sampling": worker_sampling()}),
                    st.fixed_dictionaries({"request_id": worker_request_ids}))
RAW_METHODS = ["/tandem.worker.v1.PrefillWorker/Prefill", "/tandem.worker.v1.PrefillWorker/Abort",
               "/tandem.worker.v1.PrefillWorker/GetStats", "/tandem.worker.v1.DecodeWorker/Decode",
               "/tandem.worker.v1.DecodeWorker/Abort", "/tandem.worker.v1.DecodeWorker/GetStats",
               "/tandem.worker.v1.DecodeWorker/DecodeStream"]
raw_worker_payloads = st.one_of(st.binary(max_size=100), st.builds(lambda bad: wire_field(1, bad), invalid_utf8),
                                st.builds(lambda n: _varint(n << 3 | 0) + b"\x01", st.integers(1, 2**29 - 1)))


def worker_calls() -> st.SearchStrategy[WorkerCall]:
    raw_calls = st.builds(WorkerCall, kind=st.just("raw"), raw_method=st.sampled_from(RAW_METHODS),
                          payload=raw_worker_payloads)
    valid_prefill = st.builds(w.PrefillRequest, request_id=st.builds(lambda n: f"fuzz-{n}", st.integers(0, 10**9)),
                              prompt_token_ids=st.lists(st.integers(0, VOCAB_SIZE - 1), min_size=1, max_size=24),
                              sampling=st.builds(w.SamplingParams, max_tokens=st.integers(2, 6), top_p=st.just(1.0),
                                                 top_k=st.just(-1), repetition_penalty=st.just(1.0),
                                                 ignore_eos=st.just(True)))
    return st.one_of(
        st.builds(WorkerCall, kind=st.just("prefill"), prefill=prefill_requests, abort_first=st.booleans()),
        st.builds(WorkerCall, kind=st.just("decode"), prefill=valid_prefill, tamper=tampers,
                  deadline_seconds=deadlines),
        st.builds(WorkerCall, kind=st.just("decode"), prefill=valid_prefill, fake_handle=kv_handles),
        st.builds(WorkerCall, kind=st.just("stream"), prefill=valid_prefill, tamper=tampers,
                  num_stream_requests=st.integers(1, 3), abort_first=st.booleans(), deadline_seconds=deadlines),
        st.builds(WorkerCall, kind=st.just("abort"), abort_id=st.text(max_size=300)),
        st.builds(WorkerCall, kind=st.just("stats")),
        raw_calls, raw_calls,
    )
