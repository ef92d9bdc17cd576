"""Causal prefill attention over packed ragged queries vs the PyTorch reference on poisoned pools."""

import pytest
import torch

from paged_cases import assert_matches_reference, build_paged_case
from kernels.prefill_attention import prefill_attention
from kernels.reference import paged_attention_reference


def fresh_prompts(block_size):
    """(query_lens, context_lens): whole prompts, incl. one token and one exact block."""
    return [1, block_size, block_size + 5], [1, block_size, block_size + 5]


def chunked_prompts(block_size):
    """Prior context in the pool: a chunk starting on a block boundary, chunks starting mid-block
    (prior_len = -1 and -2 mod the tile width, where the causal-mask boundary is easiest to get
    wrong), one new token after a prefix, next to a fresh prompt."""
    query_lens = [block_size, 5, block_size + 3, 1, 7, 6]
    context_lens = [2 * block_size, block_size + 7, 2 * block_size + 2, block_size + 1, 7, 2 * block_size + 4]
    return query_lens, context_lens


def _run_prefill(case, **kwargs):
    out = torch.full_like(case.query, float("nan"))
    result = prefill_attention(case.query, case.kv_cache, case.metadata, case.scale, out=out, **kwargs)
    assert result is out
    reference = paged_attention_reference(case.query.float(), case.clean_kv_cache.float(), case.metadata, case.scale)
    assert_matches_reference(out, reference)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("has_prior", [False, True])
def test_prefill_matches_reference(head_dim, group, block_size, has_prior):
    query_lens, context_lens = (chunked_prompts if has_prior else fresh_prompts)(block_size)
    case = build_paged_case(
        query_lens, context_lens, head_dim=head_dim, num_kv_heads=2, group=group, block_size=block_size, seed=7
    )
    # 16-row query blocks with tiles spanning two KV blocks, or 32-row blocks with half-block tiles.
    block_m, block_n = (16, 32) if block_size == 16 else (32, 16)
    _run_prefill(case, block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_half_precision(dtype):
    query_lens, context_lens = chunked_prompts(16)
    case = build_paged_case(
        query_lens, context_lens, head_dim=128, num_kv_heads=2, group=4, block_size=16, dtype=dtype, seed=8
    )
    _run_prefill(case)


def test_prefill_odd_head_dim_and_strided_query():
    query_lens, context_lens = [9, 20], [30, 20]
    case = build_paged_case(query_lens, context_lens, head_dim=80, num_kv_heads=1, group=3, block_size=16, seed=9)
    fused = torch.randn(29, 3 + 2, 80)  # query as a view of a fused QKV projection
    fused[:, :3] = case.query
    case.query = fused[:, :3]
    _run_prefill(case, block_m=16, block_n=16)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"block_m": 8}, "block_m"),
        ({"block_n": 48}, "block_n"),
        ({"out": torch.empty(12, 4, 64, dtype=torch.float16)}, "out must have dtype"),
    ],
)
def test_prefill_rejects_bad_options(kwargs, message):
    case = build_paged_case([5, 7], [5, 20], head_dim=64, num_kv_heads=2, group=2, block_size=16)
    with pytest.raises(ValueError, match=message):
        prefill_attention(case.query, case.kv_cache, case.metadata, case.scale, **kwargs)


def test_prefill_rejects_query_not_matching_metadata():
    case = build_paged_case([5, 7], [5, 20], head_dim=64, num_kv_heads=2, group=2, block_size=16)
    with pytest.raises(ValueError, match="query has 11 tokens"):
        prefill_attention(case.query[:11], case.kv_cache, case.metadata, case.scale)
    with pytest.raises(ValueError, match="kv_cache head_dim"):
        prefill_attention(case.query[..., :32], case.kv_cache, case.metadata, case.scale)
