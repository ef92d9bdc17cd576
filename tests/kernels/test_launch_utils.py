"""Variant keys and compile counts (kernels.launch_utils), and the launch choices that keep a
kernel's variant set independent of a step's sizes.

CPU cases run the kernels in the interpreter and check the recorded keys; the CUDA case checks that
Triton's own compile count moves exactly as the keys do.
"""

import pytest
import torch

from kernels.activation import MAX_BLOCK, MIN_BLOCK, _block_size, silu_and_mul, token_counts_per_block
from kernels.gemv import gemv
from kernels.launch_utils import (
    num_compiled_variants,
    recording_variant_keys,
    variant_key,
    variant_keys,
)
from tests.helpers.devices import DEVICES
from tests.kernels.paged_cases import assert_matches_reference, build_paged_case, run_decode, run_prefill


def kernel_keys(keys: set, name: str) -> set:
    return {key for key in keys if key[0] == name}


def test_argument_classes_follow_triton_specialisation():
    """The key of each runtime argument is what Triton's own specialisation makes of it."""
    specialize = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.compiler import BaseBackend

    from kernels.launch_utils import _argument_class

    aligned = torch.zeros(64, dtype=torch.bfloat16)
    values = [1, 0, 16, 48, 17, 2**31 + 16, 2**31 + 3, 0.5, True, aligned, aligned[3:]]
    for value in values:
        for is_specialized in (True, False):
            kind, attribute = specialize(BaseBackend, value, False, is_specialized, True)
            ours = _argument_class(value, is_specialized, True)
            if kind == "constexpr":  # Triton folds an integer 1 into the kernel
                assert ours.endswith("=1"), (value, ours)
                continue
            expected_type = {"*bf16": "*bfloat16"}.get(kind, kind)
            assert ours.split(":")[0] == expected_type, (value, ours, kind)
            assert ours.endswith(":D") == (attribute == "D"), (value, ours, attribute)


def test_decode_and_prefill_keys_ignore_the_block_table_width():
    """Tables 1, 16 and 17 blocks wide (Triton would tell 1, multiples of 16 and others apart) share
    one variant per kernel."""
    keys_by_kernel = {"_paged_decode_kernel": set(), "_prefill_attention_kernel": set()}
    for num_blocks in (1, 16, 17):
        context_lens = [3, 4 * (num_blocks - 1) + 2]
        for query_lens, run_kernel in (([1, 1], run_decode), ([2, 2], run_prefill)):
            case = build_paged_case(query_lens, context_lens, head_dim=32, num_kv_heads=2, group=2, block_size=4)
            assert case.metadata.block_tables.shape[1] == num_blocks
            with recording_variant_keys() as keys:
                out = run_kernel(case)
            assert_matches_reference(out, case.reference())
            for name in keys_by_kernel:
                keys_by_kernel[name] |= kernel_keys(keys, name)
    assert {name: len(keys) for name, keys in keys_by_kernel.items()} == dict.fromkeys(keys_by_kernel, 1)


def test_split_reduce_key_ignores_the_number_of_splits():
    case = build_paged_case([1, 1], [700, 300], head_dim=32, num_kv_heads=2, group=2, block_size=16)
    reduce_keys = set()
    for num_splits in (2, 3, 11):
        with recording_variant_keys() as keys:
            out = run_decode(case, num_splits=num_splits, block_n=16)
        assert_matches_reference(out, case.reference())
        reduce_keys |= kernel_keys(keys, "_reduce_splits_kernel")
    assert len(reduce_keys) == 1


def test_gemv_rows_and_width_classes_pick_the_variant():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(24, 64, generator=generator).to(torch.bfloat16)
    with recording_variant_keys() as keys:
        for num_rows in (1, 2, 3, 4, 4):
            gemv(torch.randn(num_rows, 64, generator=generator).to(torch.bfloat16), weight)
    assert sorted(part for key in keys for part in key[1] if part.startswith("NUM_ROWS")) == [
        f"NUM_ROWS={n}" for n in (1, 2, 3, 4)
    ]
    assert keys <= variant_keys()


def test_nothing_is_recorded_outside_a_recording_block():
    x = torch.randn(2, 64).to(torch.bfloat16)
    before = variant_keys()
    silu_and_mul(torch.randn(5, 2 * 300))
    gemv(x, torch.randn(8, 64).to(torch.bfloat16))
    assert variant_keys() == before


@pytest.mark.parametrize("intermediate", [64, 256, 1000, 3072, 8960, 14336, 28672])
def test_token_counts_per_block_reach_every_block_the_launcher_picks(intermediate):
    device = torch.device("cpu")
    counts = token_counts_per_block(intermediate, device)
    picked = {_block_size(num_tokens, intermediate, device) for num_tokens in range(1, 1025)}
    assert [_block_size(n, intermediate, device) for n in counts] == sorted(picked)
    assert counts == sorted(counts) and counts[0] == 1
    assert picked <= set(range(MIN_BLOCK, MAX_BLOCK + 1))
    for block, first in zip(sorted(picked), counts):  # each count is the smallest picking its block
        assert first == 1 or _block_size(first - 1, intermediate, device) < block


@pytest.mark.parametrize("device", DEVICES)
def test_compile_count_follows_new_keys_only(device):
    """Interpreter: nothing compiles. CUDA: at most one compile per key (earlier tests may have
    compiled some), none when the same launches repeat."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(40, 128, generator=generator).to(torch.float16).to(device)
    inputs = [torch.randn(n, 128, generator=generator).to(torch.float16).to(device) for n in (1, 2, 3, 2, 1)]
    before = num_compiled_variants()
    with recording_variant_keys() as keys:
        for x in inputs:
            gemv(x, weight)
    after_first_pass = num_compiled_variants()
    for x in inputs:
        gemv(x, weight)
    assert len(keys) == 3
    assert num_compiled_variants() == after_first_pass
    if device == "cpu":
        assert after_first_pass == before
    else:
        assert after_first_pass - before <= len(keys) and after_first_pass >= len(keys)
