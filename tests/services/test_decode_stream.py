"""The Decode stream coalesces: what queued while its writer was behind goes out as one TokenBatch (then
the final), in order, logprobs one per token; a writer that keeps up gets the same tokens."""

import asyncio

import grpc
import pytest

from common.engine.sequence import TokenLogprobs
from protos import worker_pb2, worker_pb2_grpc
from services.decode.jobs import DecodeFinal, TokenBatch, coalesce
from services.decode.servicer import DecodeServicer

PROMPT = list(range(40, 61))
MAX_TOKENS = 12


def _logprobs(token_id: int) -> TokenLogprobs:
    return TokenLogprobs(token_id, -0.5, [token_id], [-0.5])


def test_coalesce_merges_runs_of_token_batches_and_keeps_the_final_last():
    final = DecodeFinal("length", 5, None, None)
    items = [TokenBatch([1], None), TokenBatch([2], None), TokenBatch([3, 4], None), final]
    assert coalesce(items) == [TokenBatch([1, 2, 3, 4], None), final]
    assert items[0] == TokenBatch([1], None)  # the queued items are left as they were
    assert coalesce([TokenBatch([7], None)]) == [TokenBatch([7], None)]
    assert coalesce([final]) == [final]


def test_coalesce_keeps_logprobs_one_per_token():
    items = [TokenBatch([t], [_logprobs(t)]) for t in (5, 6, 7)]
    [merged] = coalesce(items)
    assert merged.token_ids == [5, 6, 7] and [lp.token_id for lp in merged.logprobs] == [5, 6, 7]
    mixed = [TokenBatch([1], [_logprobs(1)]), TokenBatch([2], None), TokenBatch([3], None)]
    assert coalesce(mixed) == [TokenBatch([1], [_logprobs(1)]), TokenBatch([2, 3], None)]


def _prefill(system, request_id: str, logprobs: int | None) -> worker_pb2.DecodeRequest:
    sampling = worker_pb2.SamplingParams(max_tokens=MAX_TOKENS, temperature=0, top_p=1.0, repetition_penalty=1.0,
                                         ignore_eos=True)
    if logprobs is not None:
        sampling.logprobs = logprobs
    with grpc.insecure_channel(system.prefill_address) as channel:
        response = worker_pb2_grpc.PrefillWorkerStub(channel).Prefill(
            worker_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=PROMPT, sampling=sampling), timeout=30)
    return worker_pb2.DecodeRequest(request_id=request_id, prompt_token_ids=PROMPT, sampling=sampling,
                                    first_token_id=response.first_token_id, kv_handle=response.kv_handle)


def _read(system, request: worker_pb2.DecodeRequest, pause_seconds: float, abort: bool = False):
    """Drives the servicer's Decode on the services' loop; pauses after the first message (a slow writer)."""

    async def read():
        servicer = DecodeServicer()
        servicer.worker = system.decode_worker
        stream = servicer.Decode(request, None)
        responses = [await stream.__anext__()]
        if abort:
            await system.decode_worker.abort(request.request_id)
        await asyncio.sleep(pause_seconds)  # the engine runs on; its outputs queue up
        try:
            async for response in stream:
                responses.append(response)
        except Exception as exc:  # noqa: BLE001 - returned for the test to check
            return responses, exc
        return responses, None

    return system.run(read())


def _tokens(responses) -> tuple[list[int], list[int]]:
    token_ids = [t for r in responses if r.HasField("tokens") for t in r.tokens.token_ids]
    logprob_ids = [lp.token_id for r in responses if r.HasField("tokens") for lp in r.tokens.logprobs]
    return token_ids, logprob_ids


@pytest.mark.parametrize("logprobs", [None, 2])
def test_a_writer_that_fell_behind_gets_one_merged_message_then_the_final(system, logprobs):
    fast, error = _read(system, _prefill(system, f"fast-{logprobs}", logprobs), pause_seconds=0)
    assert error is None
    slow, error = _read(system, _prefill(system, f"slow-{logprobs}", logprobs), pause_seconds=1.0)
    assert error is None
    assert len(slow) == 3 and slow[1].HasField("tokens") and slow[2].HasField("final")  # first, the rest, final
    assert _tokens(slow) == _tokens(fast)
    token_ids, logprob_ids = _tokens(slow)
    assert len(token_ids) == MAX_TOKENS - 1  # token #1 came from prefill
    assert logprob_ids == (token_ids if logprobs else [])
    assert slow[2].final.num_generated_tokens == MAX_TOKENS
    system.wait_until_idle()


def test_an_abort_behind_queued_tokens_ends_the_stream_cancelled_after_them(system):
    responses, error = _read(system, _prefill(system, "abort-behind", None), pause_seconds=0.5, abort=True)
    assert isinstance(error, Exception) and "aborted" in str(error)
    assert all(r.HasField("tokens") for r in responses) and len(responses) <= 2  # never a final
    prefill, decode = system.wait_until_idle()
    assert decode.num_free_blocks == decode.num_total_blocks and decode.num_running == 0
