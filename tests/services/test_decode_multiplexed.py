"""DecodeStream: many requests over one stream to a decode worker. Each step's tokens for all of them come
in one message (in its token columns unless logprobs were asked for); one request's bad input or abort
fails that request alone; the stream closing frees every request still open on it."""

import queue
import threading

import grpc
import pytest

from protos import worker_pb2, worker_pb2_grpc
from tests.services.inprocess import assert_idle
from tests.services.test_hostile_requests import PROMPT, _sampling

MAX_TOKENS = 8


def _prefill(prefill, request_id: str, prompt: list[int]) -> worker_pb2.PrefillResponse:
    return prefill.Prefill(worker_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt,
                                                     sampling=_sampling()), timeout=30)


def _decode_request(request_id: str, prompt: list[int], answer: worker_pb2.PrefillResponse, **changes):
    fields = dict(request_id=request_id, prompt_token_ids=prompt, first_token_id=answer.first_token_id,
                  sampling=_sampling(), kv_handle=answer.kv_handle)
    fields.update(changes)
    return worker_pb2.DecodeRequest(**fields)


class _Caller:
    """Writes DecodeStreamRequests when told to; the iterator ends when `close()` is called."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()

    def send(self, **kind) -> None:
        self._queue.put(worker_pb2.DecodeStreamRequest(**kind))

    def close(self) -> None:
        self._queue.put(None)

    def __iter__(self):
        while (message := self._queue.get()) is not None:
            yield message


def _in_order(response: worker_pb2.DecodeStreamResponse) -> list[worker_pb2.DecodeUpdate]:
    """A message's items as the proto says to read them: column tokens (one update each here), then
    the DecodeUpdates."""
    columns = [worker_pb2.DecodeUpdate(request_id=request_id, tokens=worker_pb2.TokenBatch(token_ids=[token_id]))
               for request_id, token_id in zip(response.token_request_ids, response.token_ids, strict=True)]
    return columns + list(response.updates)


def _collect(responses) -> tuple[dict[str, list], list[worker_pb2.DecodeStreamResponse]]:
    by_request: dict[str, list] = {}
    messages = []
    for response in responses:
        messages.append(response)
        for update in _in_order(response):
            by_request.setdefault(update.request_id, []).append(update)
    return by_request, messages


def _tokens(updates) -> list[int]:
    return [t for u in updates if u.WhichOneof("kind") == "tokens" for t in u.tokens.token_ids]


@pytest.mark.parametrize("is_batched", [False, True], ids=["a-message-each", "one-decodes-message"])
def test_one_stream_carries_every_request_in_step_sized_messages(system, is_batched):
    prompts = {f"r{i}": [p + i for p in PROMPT[: 12 + i]] for i in range(6)}
    with grpc.insecure_channel(system.prefill_address) as pc, grpc.insecure_channel(system.decode_address) as dc:
        prefill, decode = worker_pb2_grpc.PrefillWorkerStub(pc), worker_pb2_grpc.DecodeWorkerStub(dc)
        answers = {rid: _prefill(prefill, rid, prompt) for rid, prompt in prompts.items()}
        expected = {}
        for rid, prompt in prompts.items():  # the same requests, one Decode call each, one at a time
            again = _prefill(prefill, rid + "-alone", prompt)
            expected[rid] = [t for m in decode.Decode(_decode_request(rid + "-alone", prompt, again), timeout=30)
                             if m.WhichOneof("kind") == "tokens" for t in m.tokens.token_ids]
        caller = _Caller()
        requests = [_decode_request(rid, prompt, answers[rid]) for rid, prompt in prompts.items()]
        if is_batched:  # as the frontend sends the requests that became ready during its previous write
            caller.send(decodes=worker_pb2.DecodeRequestBatch(requests=requests))
        for request in [] if is_batched else requests:
            caller.send(decode=request)
        caller.close()
        by_request, messages = _collect(decode.DecodeStream(iter(caller), timeout=60))
    assert set(by_request) == set(prompts)
    for rid, updates in by_request.items():
        assert _tokens(updates) == expected[rid], rid  # greedy: the same tokens as alone
        assert len(_tokens(updates)) == MAX_TOKENS - 1  # token #1 came from prefill
        assert updates[-1].WhichOneof("kind") == "final" and updates[-1].final.num_generated_tokens == MAX_TOKENS
    assert all(u.WhichOneof("kind") == "final" for m in messages for u in m.updates)  # tokens: columns only
    num_items = sum(len(_in_order(m)) for m in messages)
    assert len(messages) < num_items / 2  # a message carries a step of every running request, not one
    assert max(len(set(m.token_request_ids)) for m in messages) >= 4
    assert_idle(system)


def test_requests_with_and_without_logprobs_share_the_stream(system):
    scored_sampling = _sampling()
    scored_sampling.logprobs = 2
    with grpc.insecure_channel(system.prefill_address) as pc, grpc.insecure_channel(system.decode_address) as dc:
        prefill, decode = worker_pb2_grpc.PrefillWorkerStub(pc), worker_pb2_grpc.DecodeWorkerStub(dc)
        plain = _prefill(prefill, "plain", PROMPT)
        scored = prefill.Prefill(worker_pb2.PrefillRequest(request_id="scored", prompt_token_ids=PROMPT,
                                                           sampling=scored_sampling), timeout=30)
        caller = _Caller()
        caller.send(decode=_decode_request("plain", PROMPT, plain))
        caller.send(decode=_decode_request("scored", PROMPT, scored, sampling=scored_sampling))
        caller.close()
        by_request, messages = _collect(decode.DecodeStream(iter(caller), timeout=60))
    scored_tokens = [u for m in messages for u in m.updates if u.WhichOneof("kind") == "tokens"]
    assert {u.request_id for u in scored_tokens} == {"scored"} and "scored" not in {
        rid for m in messages for rid in m.token_request_ids}  # logprobs: DecodeUpdates; the rest: columns
    assert [lp.token_id for u in scored_tokens for lp in u.tokens.logprobs] == _tokens(by_request["scored"])
    assert _tokens(by_request["scored"]) == _tokens(by_request["plain"])  # greedy, the same prompt
    assert len(_tokens(by_request["plain"])) == MAX_TOKENS - 1
    assert by_request["plain"][-1].WhichOneof("kind") == by_request["scored"][-1].WhichOneof("kind") == "final"
    assert any(m.token_request_ids and m.updates for m in messages)  # both kinds in one message
    assert_idle(system)


def test_a_bad_request_fails_alone_and_the_stream_goes_on(system):
    with grpc.insecure_channel(system.prefill_address) as pc, grpc.insecure_channel(system.decode_address) as dc:
        prefill, decode = worker_pb2_grpc.PrefillWorkerStub(pc), worker_pb2_grpc.DecodeWorkerStub(dc)
        good, bad = _prefill(prefill, "good", PROMPT), _prefill(prefill, "bad", PROMPT)
        caller = _Caller()
        caller.send(decode=_decode_request("bad", PROMPT, bad, first_token_id=1_000_000))
        caller.send(decode=_decode_request("good", PROMPT, good))
        caller.send(decode=_decode_request("good", PROMPT, good))  # a second start under a live id
        caller.close()
        by_request, _ = _collect(decode.DecodeStream(iter(caller), timeout=60))
        prefill.Abort(worker_pb2.AbortRequest(request_id="bad"), timeout=10)  # its lease, never pulled
    errors = [u.error for u in by_request["bad"]]
    assert len(errors) == 1 and errors[0].code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert errors[0].message.startswith("first_token_id")
    kinds = [u.WhichOneof("kind") for u in by_request["good"]]
    assert kinds.count("error") == 1  # the duplicate start, refused without touching the live request
    assert kinds[-1] == "final" and len(_tokens(by_request["good"])) == MAX_TOKENS - 1
    assert_idle(system)


def test_closing_the_stream_frees_every_open_request(system):
    long_sampling = worker_pb2.SamplingParams(max_tokens=100, temperature=0, top_p=1.0, repetition_penalty=1.0,
                                              ignore_eos=True)
    with grpc.insecure_channel(system.prefill_address) as pc, grpc.insecure_channel(system.decode_address) as dc:
        prefill, decode = worker_pb2_grpc.PrefillWorkerStub(pc), worker_pb2_grpc.DecodeWorkerStub(dc)
        caller = _Caller()
        for rid in ("a", "b", "c"):
            answer = prefill.Prefill(worker_pb2.PrefillRequest(request_id=rid, prompt_token_ids=PROMPT,
                                                               sampling=long_sampling), timeout=30)
            caller.send(decode=_decode_request(rid, PROMPT, answer, sampling=long_sampling))
        call = decode.DecodeStream(iter(caller), timeout=60)
        seen: set[str] = set()
        for response in call:  # every request is decoding: then the caller goes away
            seen |= {u.request_id for u in _in_order(response)}
            if seen == {"a", "b", "c"}:
                break
        call.cancel()
        threading.Thread(target=caller.close).start()
    assert_idle(system)


def test_a_stream_to_a_dead_engine_fails_each_request_unavailable(system):
    with grpc.insecure_channel(system.prefill_address) as pc, grpc.insecure_channel(system.decode_address) as dc:
        prefill, decode = worker_pb2_grpc.PrefillWorkerStub(pc), worker_pb2_grpc.DecodeWorkerStub(dc)
        answer = _prefill(prefill, "late", PROMPT)
        caller = _Caller()
        call = decode.DecodeStream(iter(caller), timeout=60)
        system.decode_worker.thread.stop()  # the engine thread is gone, the stream's server is not
        caller.send(decode=_decode_request("late", PROMPT, answer))
        caller.close()
        by_request, _ = _collect(call)
        prefill.Abort(worker_pb2.AbortRequest(request_id="late"), timeout=10)
    (update,) = by_request["late"]
    assert update.error.code == grpc.StatusCode.UNAVAILABLE.value[0]  # the frontend may migrate it
