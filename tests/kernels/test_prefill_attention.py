"""Causal prefill attention over packed ragged queries vs the PyTorch reference on poisoned pools.

CPU cases run the interpreter in float32; CUDA cases run the compiled kernels in float32 and
bfloat16 over the same cases, plus long prompts that would be too slow to interpret.
"""

import pytest
import torch

from paged_cases import build_paged_case, run_against_reference, run_prefill
from kernels.prefill_attention import prefill_attention
from tests.helpers.devices import DEVICES, device_dtypes

FP32_ON_CPU_FP32_BF16_ON_CUDA = device_dtypes([torch.float32], [torch.float32, torch.bfloat16])


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
    run_against_reference(run_prefill, case, **kwargs)


@pytest.mark.parametrize("device, dtype", FP32_ON_CPU_FP32_BF16_ON_CUDA)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("has_prior", [False, True])
def test_prefill_matches_reference(head_dim, group, block_size, has_prior, device, dtype):
    query_lens, context_lens = (chunked_prompts if has_prior else fresh_prompts)(block_size)
    case = build_paged_case(
        query_lens, context_lens, head_dim=head_dim, num_kv_heads=2, group=group, block_size=block_size, seed=7,
        dtype=dtype, device=device,
    )
    # 16-row query blocks with tiles spanning two KV blocks, or 32-row blocks with half-block tiles.
    block_m, block_n = (16, 32) if block_size == 16 else (32, 16)
    _run_prefill(case, block_m=block_m, block_n=block_n)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefill_half_precision(dtype, device):
    query_lens, context_lens = chunked_prompts(16)
    case = build_paged_case(
        query_lens, context_lens, head_dim=128, num_kv_heads=2, group=4, block_size=16, dtype=dtype, seed=8,
        device=device,
    )
    _run_prefill(case)  # default tiles: the interpreter's on CPU, the tuned ones on CUDA


@pytest.mark.parametrize("device, dtype", FP32_ON_CPU_FP32_BF16_ON_CUDA)
def test_prefill_odd_head_dim_and_strided_query(device, dtype):
    query_lens, context_lens = [9, 20], [30, 20]
    case = build_paged_case(
        query_lens, context_lens, head_dim=80, num_kv_heads=1, group=3, block_size=16, seed=9, dtype=dtype,
        device=device,
    )
    fused = torch.randn(29, 3 + 2, 80).to(device=device, dtype=dtype)  # query as a view of a fused QKV projection
    fused[:, :3] = case.query
    case.query = fused[:, :3]
    _run_prefill(case, block_m=16, block_n=16)


def long_chunked_prompts(block_size: int) -> tuple[list[int], list[int]]:
    """(query_lens, context_lens) with several query tiles per sequence: a one-token prompt, one
    block, a prompt ending just past a block, long chunks after long (block-aligned and not)
    prefixes, and one decode-like token after a long prefix."""
    query_lens = [1, block_size, 8 * block_size + 1, 300, 700, 517, 1]
    context_lens = [1, block_size, 8 * block_size + 1, 300 + 40 * block_size, 1500, 517 + 333, 1200]
    return query_lens, context_lens


@pytest.mark.parametrize("device, dtype", device_dtypes([], [torch.float32, torch.bfloat16]))
@pytest.mark.parametrize("head_dim, group", [(64, 1), (128, 4)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("tiles", [None, (64, 16)])
def test_prefill_long_ragged_prompts(head_dim, group, block_size, tiles, device, dtype):
    """CUDA only (the interpreter is too slow for it; test_prefill_matches_reference is its CPU
    sibling): many query tiles per sequence and long prior contexts, default and explicit tiles."""
    query_lens, context_lens = long_chunked_prompts(block_size)
    case = build_paged_case(
        query_lens, context_lens, head_dim=head_dim, num_kv_heads=2, group=group, block_size=block_size,
        seed=10, dtype=dtype, device=device,
    )
    block_m, block_n = tiles or (None, None)
    _run_prefill(case, block_m=block_m, block_n=block_n)


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
        run_prefill(case, **kwargs)


def test_prefill_rejects_inputs_that_do_not_fit_together():
    case = build_paged_case([5, 7], [5, 20], head_dim=64, num_kv_heads=2, group=2, block_size=16)
    with pytest.raises(ValueError, match="kv_cache head_dim"):
        run_prefill(case, query=case.query[..., :32])
    metadata = case.metadata
    with pytest.raises(ValueError, match="query_start_locs has 2 entries"):
        prefill_attention(case.query, case.kv_cache, metadata.block_tables, metadata.query_start_locs[:2],
                          metadata.context_lens, metadata.max_query_len, case.scale)
