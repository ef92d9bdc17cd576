"""Paged decode attention (single-pass and split-KV) vs the PyTorch reference on poisoned pools.

CPU cases run the interpreter in float32; CUDA cases run the compiled kernels in float32 and
bfloat16 over the same cases, plus larger batches that would be too slow to interpret.
"""

import pytest
import torch

from paged_cases import build_paged_case, decode_context_lens, run_against_reference, run_decode
from kernels import paged_decode_attention as decode_module
from kernels.paged_decode_attention import choose_num_splits
from tests.helpers.devices import DEVICES, device_dtypes

FP32_ON_CPU_FP32_BF16_ON_CUDA = device_dtypes([torch.float32], [torch.float32, torch.bfloat16])


@pytest.fixture
def split_workspaces(monkeypatch):
    """NaN-fills the split partial buffers and records how many partitions each call used."""
    num_splits_used = []

    def poisoned_workspace(num_seqs, num_heads, num_splits, head_dim, device):
        num_splits_used.append(num_splits)
        partial_out = torch.full((num_seqs, num_heads, num_splits, head_dim), float("nan"), device=device)
        return partial_out, torch.full((num_seqs, num_heads, num_splits), float("nan"), device=device)

    monkeypatch.setattr(decode_module, "_new_split_workspace", poisoned_workspace)
    return num_splits_used


def _run_decode(case, **kwargs):
    run_against_reference(run_decode, case, **kwargs)


@pytest.mark.parametrize("device, dtype", FP32_ON_CPU_FP32_BF16_ON_CUDA)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("is_split", [False, True])
def test_decode_matches_reference(head_dim, group, block_size, is_split, device, dtype, split_workspaces):
    context_lens = decode_context_lens(block_size)
    case = build_paged_case(
        [1] * len(context_lens), context_lens, head_dim=head_dim, num_kv_heads=2, group=group,
        block_size=block_size, dtype=dtype, device=device,
    )
    # Tiles narrower than a KV block (32) or spanning two of them (16): both gather paths.
    block_n = 16 if is_split or block_size == 32 else 32
    _run_decode(case, num_splits=3 if is_split else 1, block_n=block_n)
    assert split_workspaces == ([3] if is_split else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_split", [False, True])
def test_decode_half_precision(dtype, is_split, device, split_workspaces):
    context_lens = [37, 1, 64]
    case = build_paged_case(
        [1] * 3, context_lens, head_dim=128, num_kv_heads=2, group=4, block_size=16, dtype=dtype, seed=3,
        device=device,
    )
    _run_decode(case, num_splits=4 if is_split else 1, block_n=16)
    assert split_workspaces == ([4] if is_split else [])


@pytest.mark.parametrize("device, dtype", FP32_ON_CPU_FP32_BF16_ON_CUDA)
def test_decode_head_dim_not_a_power_of_two(device, dtype, split_workspaces):
    case = build_paged_case(
        [1] * 3, [5, 16, 40], head_dim=80, num_kv_heads=2, group=3, block_size=16, dtype=dtype, seed=4, device=device
    )
    _run_decode(case, num_splits=1, block_n=16)
    _run_decode(case, num_splits=2, block_n=16)


@pytest.mark.parametrize("device, dtype", FP32_ON_CPU_FP32_BF16_ON_CUDA)
def test_decode_default_path_and_strided_query(device, dtype, split_workspaces):
    case = build_paged_case(
        [1] * 4, [3, 16, 17, 50], head_dim=64, num_kv_heads=2, group=4, block_size=16, dtype=dtype, seed=5,
        device=device,
    )
    fused = torch.randn(4, 8 + 2 * 2, 64).to(device=device, dtype=dtype)  # query as a view of a fused QKV projection
    fused[:, :8] = case.query
    case.query = fused[:, :8]
    _run_decode(case)


def large_decode_context_lens(block_size: int, num_seqs: int, seed: int) -> list[int]:
    """Block-boundary lengths (1, one block, long contexts ending on and just past a block) plus
    random ones up to 3000 tokens."""
    boundary = [1, block_size, block_size + 1, 64 * block_size, 64 * block_size + 1, 2000]
    generator = torch.Generator().manual_seed(seed)
    return boundary + torch.randint(1, 3000, (num_seqs - len(boundary),), generator=generator).tolist()


@pytest.mark.parametrize("device, dtype", device_dtypes([], [torch.float32, torch.bfloat16]))
@pytest.mark.parametrize("head_dim, num_kv_heads, group", [(128, 2, 4), (64, 1, 8)])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("num_splits", [None, 1])
def test_decode_large_ragged_batch(
    head_dim, num_kv_heads, group, block_size, num_splits, device, dtype, split_workspaces
):
    """CUDA only (the interpreter is too slow for it; test_decode_matches_reference is its CPU
    sibling): long ragged contexts, split by the heuristic (None: the 24-48 program grid is far
    below 4 programs per SM, so it splits into ~10 partitions) or single-pass."""
    context_lens = large_decode_context_lens(block_size, num_seqs=24, seed=head_dim + group + block_size)
    case = build_paged_case(
        [1] * len(context_lens), context_lens, head_dim=head_dim, num_kv_heads=num_kv_heads, group=group,
        block_size=block_size, dtype=dtype, seed=6, device=device,
    )
    _run_decode(case, num_splits=num_splits)
    assert (split_workspaces[0] > 1) if num_splits is None else split_workspaces == []


def test_choose_num_splits_only_splits_underfilled_grids():
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_context_len=8192, num_sms=132) == 32
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_context_len=600, num_sms=132) == 2
    assert choose_num_splits(num_seqs=1, num_kv_heads=8, max_context_len=200, num_sms=132) == 1
    assert choose_num_splits(num_seqs=256, num_kv_heads=8, max_context_len=8192, num_sms=132) == 1
    assert 1 < choose_num_splits(num_seqs=16, num_kv_heads=8, max_context_len=8192, num_sms=132) <= 5


def _bad(field):
    case = build_paged_case([1, 1], [5, 20], head_dim=64, num_kv_heads=2, group=2, block_size=16)
    if field == "dtype":
        case.query = case.query.half()
    elif field == "heads":
        case.query = case.query[:, :3]
    elif field == "tokens":
        case.query = torch.cat([case.query, case.query])
    elif field == "block_tables":
        case.metadata.block_tables = case.metadata.block_tables.float()
    elif field == "context_lens":
        case.metadata.context_lens = case.metadata.context_lens[:1]
    return case


@pytest.mark.parametrize(
    "field, kwargs, message",
    [
        ("dtype", {}, "kv_cache dtype"),
        ("heads", {}, "not a multiple of num_kv_heads"),
        ("tokens", {}, "one query token per sequence"),
        ("block_tables", {}, "block_tables must have dtype"),
        ("context_lens", {}, "describes 1 sequences"),
        (None, {"block_n": 24}, "block_n"),
        (None, {"num_splits": 0}, "num_splits"),
        (None, {"out": torch.empty(2, 4, 32)}, "out must have shape"),
    ],
)
def test_decode_rejects_bad_inputs(field, kwargs, message):
    case = _bad(field)
    with pytest.raises(ValueError, match=message):
        run_decode(case, **kwargs)
