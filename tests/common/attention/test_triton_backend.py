"""The Triton backend end to end: chunked prefill then decode, step by step against the reference,
on the CPU (interpreter) and on CUDA (compiled kernels)."""

import pytest
import torch

from common.attention import triton_backend
from common.attention.backend import REFERENCE, get_attention_backend
from common.attention.metadata import AttentionMetadata
from common.attention.triton_backend import TRITON
from tests.helpers.devices import DEVICES
from tests.kernels.paged_cases import build_paged_case

NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 2, 4, 64, 16, 12
# Sequence A: a 40-token prompt in two chunks (24 + 16) then one decode step.
# Sequence B: a 9-token prompt in one chunk, then a decode step. Neither owns block 0.
BLOCK_TABLES = [[7, 2, 11], [5]]
STEPS = [  # (query_lens, context_lens) per step, over the sequences active in it
    ([24, 9], [24, 9]),
    ([16], [40]),
    ([1, 1], [41, 10]),
]
SEQS_PER_STEP = [[0, 1], [0], [0, 1]]


@pytest.mark.parametrize("device", DEVICES)
def test_triton_backend_matches_reference_over_chunked_prefill_and_decode(monkeypatch, device):
    backend = get_attention_backend("triton", torch.device(device))
    assert backend is TRITON and backend.name == "triton"
    assert get_attention_backend("auto", torch.device(device)) is (TRITON if device == "cuda" else REFERENCE)
    decode_calls = []
    real_decode = triton_backend.paged_decode_attention
    monkeypatch.setattr(triton_backend, "paged_decode_attention",
                        lambda *args, **kwargs: decode_calls.append(1) or real_decode(*args, **kwargs))
    generator = torch.Generator().manual_seed(11)
    # The reference runs on the CPU (float32 as written, whatever the device's matmul settings).
    reference_pool = torch.randn(2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=generator)
    triton_pool = reference_pool.to(device)
    for (query_lens, context_lens), seq_ids in zip(STEPS, SEQS_PER_STEP):
        tables = [BLOCK_TABLES[i] for i in seq_ids]
        metadata = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE, device=device)
        cpu_metadata = AttentionMetadata.build(query_lens, context_lens, tables, BLOCK_SIZE)
        num_tokens = sum(query_lens)
        query = torch.randn(num_tokens, NUM_KV_HEADS * GROUP, HEAD_DIM, generator=generator)
        key = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator)
        value = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=generator)

        TRITON.write_kv_cache(key.to(device), value.to(device), triton_pool, metadata.slot_mapping)
        REFERENCE.write_kv_cache(key, value, reference_pool, cpu_metadata.slot_mapping)
        assert torch.equal(triton_pool.cpu(), reference_pool)
        out = TRITON.paged_attention(query.to(device), triton_pool, metadata, HEAD_DIM**-0.5)
        expected = REFERENCE.paged_attention(query, reference_pool, cpu_metadata, HEAD_DIM**-0.5)
        torch.testing.assert_close(out.cpu(), expected, atol=2e-5, rtol=1e-4)
    assert decode_calls == [1]  # only the last step is a decode step


def test_prefill_path_rejects_a_query_that_does_not_match_the_metadata():
    case = build_paged_case([5, 7], [5, 20], head_dim=64, num_kv_heads=2, group=2, block_size=16)
    with pytest.raises(ValueError, match="query has 11 tokens, metadata.query_start_locs ends at 12"):
        TRITON.prefill_attention(case.query[:11], case.kv_cache, case.metadata, case.scale)


def test_decode_path_refuses_a_prefill_step():
    case = build_paged_case([5, 7], [5, 20], head_dim=64, num_kv_heads=2, group=2, block_size=16)
    with pytest.raises(ValueError, match="one query token per sequence"):
        TRITON.decode_attention(case.query, case.kv_cache, case.metadata, case.scale)
