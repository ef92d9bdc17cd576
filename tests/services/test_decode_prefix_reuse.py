"""Prefix caching across the KV hand-off, through the services (frontend, prefill and decode workers over
gRPC, the in-process KV transport): a second turn of a conversation computes only what the prefill
worker lacks, and pulls only the blocks the decode worker lacks; hashes that do not match the prompt
are refused; every block comes back after every request.
"""

import random
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from common.engine.config import EngineConfig
from common.engine.llm_engine import LLMEngine
from common.engine.sampling_params import SamplingParams
from common.otlp_collector import OtlpCollector
from common.tracing import Attr
from protos import generation_pb2 as g
from protos import generation_pb2_grpc, worker_pb2, worker_pb2_grpc
from tests.services.inprocess import ENGINE_SETTINGS, assert_idle

BLOCK_SIZE = ENGINE_SETTINGS["block_size"]
LABELS = {"model_name": "tiny"}


def _generate(frontend_address: str, prompt: list[int], max_tokens: int) -> list[int]:
    with grpc.insecure_channel(frontend_address) as channel:
        responses = list(generation_pb2_grpc.GenerationStub(channel).Generate(g.GenerateRequest(
            token_ids=g.TokenIds(ids=prompt),
            sampling=g.SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)), timeout=60))
    return [t for r in responses if r.HasField("chunk") for t in r.chunk.token_ids]


def _reference(tiny_folder, tiny_model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens of one engine without prefix caching."""
    model, model_config = tiny_model
    settings = {**ENGINE_SETTINGS, "enable_prefix_caching": False}
    engine = LLMEngine(EngineConfig(model=str(tiny_folder), **settings), model=model, model_config=model_config)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    for index, prompt in enumerate(prompts):
        engine.add_request(str(index), prompt, params)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
    return [tokens[str(index)] for index in range(len(prompts))]


class Counters:
    """Reads a worker's counters (its Prometheus registry) as differences from the last read."""

    NAMES = ("prefix_cache_queries", "prefix_cache_hits", "kv_transfer_bytes", "prompt_tokens")

    def __init__(self, system, role: str):
        self._registry, self._role = system.observability[role].metrics.registry, role
        self._last = self._read()

    def _read(self) -> dict[str, float]:
        labels = {**LABELS, "role": self._role}
        return {name: self._registry.get_sample_value(f"tandem:{name}_total", labels) or 0.0 for name in self.NAMES}

    def delta(self) -> dict[str, float]:
        now = self._read()
        delta = {name: now[name] - self._last[name] for name in self.NAMES}
        self._last = now
        return delta


def _wait_for_counters(system) -> None:
    """Counters follow each engine loop's stats refresh: wait until both workers are idle."""
    system.wait_until_idle()
    time.sleep(0.2)


def test_a_second_turn_computes_only_its_new_tokens_and_pulls_only_the_blocks_decode_lacks(
        make_system, tiny_folder, tiny_model):
    rng = random.Random(3)
    turn1 = [rng.randrange(300, 20_000) for _ in range(30)]
    new_tokens = [rng.randrange(300, 20_000) for _ in range(7)]
    with OtlpCollector() as collector:
        system = make_system(otlp_endpoint=collector.endpoint)
        prefill, decode = Counters(system, "prefill"), Counters(system, "decode")
        answer1 = _generate(system.frontend_address, turn1, max_tokens=10)
        _wait_for_counters(system)
        prefill.delta(), decode.delta()
        turn2 = turn1 + answer1 + new_tokens  # the client sends the history back, as chat does
        answer2 = _generate(system.frontend_address, turn2, max_tokens=10)
        _wait_for_counters(system)
        for observability in system.observability.values():
            observability.tracing.force_flush()
        spans = collector.wait_for_spans(lambda spans: sum(s.name == "kv.send" for s in spans) == 2, timeout=10)
        system.stop()
    assert [answer1, answer2] == _reference(tiny_folder, tiny_model, [turn1, turn2], 10)

    # Prefill: it holds turn 1's prompt blocks, so it computes turn 1's answer and the new tokens only.
    num_prefill_cached = (len(turn1) // BLOCK_SIZE) * BLOCK_SIZE
    prefill_delta = prefill.delta()
    assert prefill_delta["prefix_cache_queries"] == len(turn2)
    assert prefill_delta["prefix_cache_hits"] == num_prefill_cached
    assert prefill_delta["prompt_tokens"] == len(turn2)
    # Decode: it wrote the KV of turn 1's prompt and of every answer token but the last; it reuses
    # those full blocks and pulls the rest.
    num_reused_blocks = (len(turn1) + len(answer1) - 1) // BLOCK_SIZE
    num_pulled_blocks = -(-len(turn2) // BLOCK_SIZE) - num_reused_blocks
    assert num_reused_blocks == 9 and num_pulled_blocks == 3
    bytes_per_block = system.decode_worker.layout.bytes_per_block
    decode_delta = decode.delta()
    assert decode_delta["prefix_cache_queries"] == len(turn2)
    assert decode_delta["prefix_cache_hits"] == num_reused_blocks * BLOCK_SIZE
    assert decode_delta["kv_transfer_bytes"] == num_pulled_blocks * bytes_per_block
    assert prefill_delta["kv_transfer_bytes"] == num_pulled_blocks * bytes_per_block

    def by_turn(name):
        return sorted((s for s in spans if s.name == name), key=lambda s: s.start_ns)

    for name in ("kv.recv", "kv.send", "decode.generate"):
        first, second = (span.attributes for span in by_turn(name))
        assert (first[Attr.KV_REUSED_BLOCKS], first[Attr.KV_CACHED_TOKENS]) == (0, 0), name
        assert second[Attr.KV_REUSED_BLOCKS] == num_reused_blocks, name
        assert second[Attr.KV_CACHED_TOKENS] == num_reused_blocks * BLOCK_SIZE, name
        assert first[Attr.KV_BLOCKS] == -(-len(turn1) // BLOCK_SIZE) and second[Attr.KV_BLOCKS] == num_pulled_blocks
    for name in ("kv.recv", "kv.send"):
        assert by_turn(name)[1].attributes[Attr.KV_BYTES] == num_pulled_blocks * bytes_per_block


def test_conversations_in_parallel_under_eviction_match_no_caching_and_leave_every_block_free(
        make_system, tiny_folder, tiny_model):
    rng = random.Random(4)
    system_prompt = [rng.randrange(300, 20_000) for _ in range(13)]
    firsts = [system_prompt + [rng.randrange(300, 20_000) for _ in range(rng.randint(3, 9))] for _ in range(6)]
    system = make_system(decode_overrides={"num_kv_blocks": 40}, prefill_overrides={"num_kv_blocks": 48})
    with ThreadPoolExecutor(len(firsts)) as pool:
        answers = list(pool.map(lambda prompt: _generate(system.frontend_address, prompt, 8), firsts))
        seconds = [first + answer + [rng.randrange(300, 20_000) for _ in range(5)]
                   for first, answer in zip(firsts, answers)]
        second_answers = list(pool.map(lambda prompt: _generate(system.frontend_address, prompt, 8), seconds))
    assert answers + second_answers == _reference(tiny_folder, tiny_model, firsts + seconds, 8)
    assert_idle(system)
    engine = system.decode_worker.engine
    assert engine.stats().prefix_cache_hits_tokens > 0 and engine.prefix_cache.num_evicted_blocks > 0
    assert all(engine.allocator.ref_count(b) == 0 for b in range(engine.allocator.num_blocks))


def _prefill(stub, request_id: str, prompt: list[int]) -> worker_pb2.PrefillResponse:
    sampling = worker_pb2.SamplingParams(max_tokens=6, temperature=0, top_p=1.0, repetition_penalty=1.0,
                                         ignore_eos=True)
    return stub.Prefill(worker_pb2.PrefillRequest(request_id=request_id, prompt_token_ids=prompt,
                                                  sampling=sampling), timeout=30)


def _decode(stub, request_id: str, prompt: list[int], response: worker_pb2.PrefillResponse, handle=None) -> list:
    request = worker_pb2.DecodeRequest(
        request_id=request_id, prompt_token_ids=prompt, first_token_id=response.first_token_id,
        sampling=worker_pb2.SamplingParams(max_tokens=6, temperature=0, top_p=1.0, repetition_penalty=1.0,
                                           ignore_eos=True),
        kv_handle=handle if handle is not None else response.kv_handle)
    return list(stub.Decode(request, timeout=30))


def _without_hashes(handle):
    copy = worker_pb2.KVHandle()
    copy.CopyFrom(handle)
    del copy.block_hashes[:]
    return copy


def _with_short_hash(handle):
    copy = worker_pb2.KVHandle()
    copy.CopyFrom(handle)
    copy.block_hashes[1] = b"short"
    return copy


@pytest.mark.parametrize("tamper, match", [
    (lambda prompt, handle: (prompt[:5] + [prompt[5] + 1] + prompt[6:], handle),
     "kv_handle.block_hashes: block 1 differs"),
    (lambda prompt, handle: (prompt, _without_hashes(handle)), "kv_handle.block_hashes: missing"),
    (lambda prompt, handle: (prompt, _with_short_hash(handle)), "kv_handle.block_hashes: each hash must be 16 bytes"),
])
def test_a_handle_whose_block_hashes_do_not_name_the_prompt_is_invalid_argument(make_system, tamper, match):
    system = make_system()
    prompt = list(range(400, 422))
    with grpc.insecure_channel(system.prefill_address) as p, grpc.insecure_channel(system.decode_address) as d:
        prefill_stub, decode_stub = worker_pb2_grpc.PrefillWorkerStub(p), worker_pb2_grpc.DecodeWorkerStub(d)
        response = _prefill(prefill_stub, "r", prompt)
        assert len(response.kv_handle.block_hashes) == len(prompt) // BLOCK_SIZE
        bad_prompt, bad_handle = tamper(prompt, response.kv_handle)
        with pytest.raises(grpc.RpcError) as info:
            _decode(decode_stub, "r", bad_prompt, response, bad_handle)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and match in info.value.details()
        assert system.sender.num_pending == 1  # refused before any pull: the offer is untouched
        assert _decode(decode_stub, "r", prompt, response)[-1].HasField("final")  # the real pair still works
    assert_idle(system)


def test_an_expired_offer_frees_the_reservation_and_the_reused_blocks_stay_cached(make_system):
    system = make_system(lease_seconds=0.5)
    turn1 = list(range(500, 526))
    answer1 = _generate(system.frontend_address, turn1, max_tokens=6)
    turn2 = turn1 + answer1 + [7, 8, 9]
    engine = system.decode_worker.engine
    with grpc.insecure_channel(system.prefill_address) as p, grpc.insecure_channel(system.decode_address) as d:
        prefill_stub, decode_stub = worker_pb2_grpc.PrefillWorkerStub(p), worker_pb2_grpc.DecodeWorkerStub(d)
        response = _prefill(prefill_stub, "late", turn2)
        time.sleep(1.0)  # the lease runs out before the decode worker pulls
        hits_before = engine.stats().prefix_cache_hits_tokens
        with pytest.raises(grpc.RpcError) as info:
            _decode(decode_stub, "late", turn2, response)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert engine.stats().prefix_cache_hits_tokens > hits_before  # it had reserved the cached blocks
    assert_idle(system)
    hits_before = engine.stats().prefix_cache_hits_tokens
    assert _generate(system.frontend_address, turn2, max_tokens=6)  # a retry finds them still cached
    assert engine.stats().prefix_cache_hits_tokens - hits_before == (len(turn1) + len(answer1) - 1) // BLOCK_SIZE * BLOCK_SIZE
    assert_idle(system)
