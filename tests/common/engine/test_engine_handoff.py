"""Prefill on one engine, decode on another, KV moved by gather/scatter: same tokens as one engine."""

import random

import pytest

from common.engine.sampling_params import SamplingParams
from common.kv import OutOfKVBlocks
from tests.common.engine.engine_helpers import run_to_completion


def requests():
    rng = random.Random(11)
    params = [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.9, top_p=0.95, seed=5, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, top_k=20, seed=9, max_tokens=14, ignore_eos=True),
    ]
    return [(f"r{i}", [rng.randrange(3, 512) for _ in range(rng.randint(3, 21))], p) for i, p in enumerate(params)]


def test_prefill_then_decode_equals_one_engine(make_engine):
    single = make_engine()
    for request_id, prompt, params in requests():
        single.add_request(request_id, prompt, params)
    expected, _ = run_to_completion(single)

    prefill = make_engine(seed=1)
    decode = make_engine(seed=2)
    decode.reserve_kv("occupy", list(range(9)))  # so the decode side's block ids differ from the prefill side's
    for request_id, prompt, params in requests():
        prefill.add_prefill_request(request_id, prompt, params)
    first_outputs = {}
    while prefill.has_unfinished_requests():
        for output in prefill.step():
            first_outputs[output.request_id] = output
    tokens = {}
    for request_id, prompt, params in requests():
        output = first_outputs[request_id]
        assert output.finished and output.finish_reason is None and len(output.new_token_ids) == 1
        assert len(output.kv_block_ids) == -(-len(prompt) // 4)
        block_ids = decode.reserve_kv(request_id, prompt).block_ids
        assert block_ids != output.kv_block_ids
        decode.kv_pool.scatter_blocks(block_ids, prefill.kv_pool.gather_blocks(output.kv_block_ids))
        assert prefill.release_kv(request_id) and not prefill.release_kv(request_id)
        decode.add_decode_request(request_id, prompt, output.new_token_ids[0], params, block_ids)
        tokens[request_id] = list(output.new_token_ids)
    assert prefill.stats().kv_cache_usage == 0
    decoded, _ = run_to_completion(decode)
    for request_id in expected:
        assert tokens[request_id] + decoded[request_id] == expected[request_id], request_id
    decode.abort_request("occupy")
    assert decode.stats().kv_cache_usage == 0


def test_first_token_can_finish_the_request(make_engine):
    prefill, decode = make_engine(), make_engine()
    prefill.add_prefill_request("a", [5, 6, 7], SamplingParams(max_tokens=1))
    (output,) = prefill.step()
    assert output.finished and output.finish_reason == "length" and output.kv_block_ids
    assert prefill.stats().num_free_blocks == prefill.stats().num_total_blocks - 1  # held until released
    prefill.abort_request("a")  # abort also releases held blocks
    assert prefill.stats().kv_cache_usage == 0
    block_ids = decode.reserve_kv("a", [5, 6, 7]).block_ids
    decode.add_decode_request("a", [5, 6, 7], output.new_token_ids[0], SamplingParams(max_tokens=1), block_ids)
    (final,) = decode.step()
    assert final.finished and final.finish_reason == "length" and final.new_token_ids == []
    assert decode.stats().kv_cache_usage == 0


def test_reserve_kv_errors(make_engine):
    engine = make_engine(num_kv_blocks=64, max_model_len=128)
    block_ids = engine.reserve_kv("a", [5] * 100).block_ids  # 25 blocks of 4
    engine.reserve_kv("b", [6] * 127)  # 32 blocks: 7 left
    with pytest.raises(OutOfKVBlocks):
        engine.reserve_kv("c", [7] * 29)  # 8 blocks
    assert engine.stats().num_free_blocks == 7  # a refused reservation holds nothing
    with pytest.raises(ValueError, match="already in use"):
        engine.reserve_kv("a", [5] * 4)
    with pytest.raises(ValueError, match="prompt_token_ids must have 1 to 127 tokens"):
        engine.reserve_kv("d", [5] * 128)
    with pytest.raises(ValueError, match="outside"):
        engine.reserve_kv("d", [5] * 3 + [9999])
    with pytest.raises(ValueError, match="block_hashes"):
        engine.reserve_kv("d", [5] * 9, block_hashes=[])  # 9 tokens fill 2 blocks of 4
    with pytest.raises(ValueError, match="reserve_kv returned"):
        engine.add_decode_request("a", [5] * 100, 7, SamplingParams(), [0, 1])
    with pytest.raises(ValueError, match="reserve_kv was given"):
        engine.add_decode_request("a", [5] * 99 + [6], 7, SamplingParams(), block_ids)
    with pytest.raises(ValueError, match="first_token_id"):
        engine.add_decode_request("a", [5] * 100, 9999, SamplingParams(), block_ids)
    assert engine.stats().num_free_blocks == 7  # the reservation survives a rejected request
    engine.abort_request("a")
    engine.abort_request("b")
    assert engine.stats().kv_cache_usage == 0
