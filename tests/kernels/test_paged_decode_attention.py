"""Paged decode attention (single-pass and split-KV) vs the PyTorch reference on poisoned pools."""

import pytest
import torch

from paged_cases import assert_matches_reference, build_paged_case, decode_context_lens
from kernels import paged_decode_attention as decode_module
from kernels.paged_decode_attention import choose_num_splits, paged_decode_attention
from kernels.reference import paged_attention_reference


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
    out = torch.full_like(case.query, float("nan"))
    result = paged_decode_attention(case.query, case.kv_cache, case.metadata, case.scale, out=out, **kwargs)
    assert result is out
    reference = paged_attention_reference(case.query.float(), case.clean_kv_cache.float(), case.metadata, case.scale)
    assert_matches_reference(out, reference.to(out.dtype) if out.dtype == torch.float32 else reference)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("is_split", [False, True])
def test_decode_matches_reference(head_dim, group, block_size, is_split, split_workspaces):
    context_lens = decode_context_lens(block_size)
    case = build_paged_case(
        [1] * len(context_lens), context_lens, head_dim=head_dim, num_kv_heads=2, group=group, block_size=block_size
    )
    # Tiles narrower than a KV block (32) or spanning two of them (16): both gather paths.
    block_n = 16 if is_split or block_size == 32 else 32
    _run_decode(case, num_splits=3 if is_split else 1, block_n=block_n)
    assert split_workspaces == ([3] if is_split else [])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_split", [False, True])
def test_decode_half_precision(dtype, is_split, split_workspaces):
    context_lens = [37, 1, 64]
    case = build_paged_case(
        [1] * 3, context_lens, head_dim=128, num_kv_heads=2, group=4, block_size=16, dtype=dtype, seed=3
    )
    _run_decode(case, num_splits=4 if is_split else 1, block_n=16)
    assert split_workspaces == ([4] if is_split else [])


def test_decode_head_dim_not_a_power_of_two(split_workspaces):
    case = build_paged_case([1] * 3, [5, 16, 40], head_dim=80, num_kv_heads=2, group=3, block_size=16, seed=4)
    _run_decode(case, num_splits=1, block_n=16)
    _run_decode(case, num_splits=2, block_n=16)


def test_decode_default_path_and_strided_query(split_workspaces):
    case = build_paged_case([1] * 4, [3, 16, 17, 50], head_dim=64, num_kv_heads=2, group=4, block_size=16, seed=5)
    fused = torch.randn(4, 8 + 2 * 2, 64)  # query as a view of a fused QKV projection
    fused[:, :8] = case.query
    case.query = fused[:, :8]
    _run_decode(case)


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
        ("block_tables", {}, "metadata.block_tables must have dtype"),
        ("context_lens", {}, "describes 1 sequences"),
        (None, {"block_n": 24}, "block_n"),
        (None, {"num_splits": 0}, "num_splits"),
        (None, {"out": torch.empty(2, 4, 32)}, "out must have shape"),
    ],
)
def test_decode_rejects_bad_inputs(field, kwargs, message):
    case = _bad(field)
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(case.query, case.kv_cache, case.metadata, case.scale, **kwargs)
