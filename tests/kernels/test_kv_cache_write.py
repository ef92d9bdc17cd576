"""Triton KV-cache scatter vs write_kv_cache_reference: exact copies, casts, strided inputs, errors.

Each behaviour runs on the CPU (interpreter) and on CUDA (compiled kernel); input checks are
device-independent and run on the CPU only.
"""

import pytest
import torch

import common.attention  # noqa: F401  (kernels.reference cannot be the first import of the package)
from kernels.kv_cache_write import write_kv_cache
from kernels.reference import write_kv_cache_reference
from tests.helpers.devices import DEVICES


def _scatter_inputs(num_tokens, num_kv_heads, head_dim, block_size, dtype, cache_dtype, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    num_blocks = 7
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(cache_dtype)
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]  # scattered, unique
    key = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    value = torch.randn(num_tokens, num_kv_heads, head_dim, generator=generator).to(dtype)
    return key.to(device), value.to(device), cache.to(device), slots.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("num_kv_heads", [1, 3, 8])
@pytest.mark.parametrize("block_size", [16, 32])
def test_write_matches_reference(head_dim, num_kv_heads, block_size, device):
    key, value, cache, slots = _scatter_inputs(
        11, num_kv_heads, head_dim, block_size, torch.float32, torch.float32, device=device
    )
    expected = cache.clone()
    write_kv_cache_reference(key, value, expected, slots)
    write_kv_cache(key, value, cache, slots)
    assert torch.equal(cache, expected)  # written slots hold the new K/V, all others are untouched


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype, cache_dtype",
    [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)],
)
def test_write_half_precision_and_casts(dtype, cache_dtype, device):
    key, value, cache, slots = _scatter_inputs(9, 2, 64, 16, dtype, cache_dtype, seed=1, device=device)
    expected = cache.clone()
    write_kv_cache_reference(key, value, expected, slots.to(torch.int32).long())
    write_kv_cache(key, value, cache, slots.to(torch.int32))
    torch.testing.assert_close(cache.float(), expected.float(), atol=0, rtol=8e-3)  # one bf16 rounding at most


@pytest.mark.parametrize("device", DEVICES)
def test_write_reads_strided_views_of_a_fused_projection(device):
    num_tokens, num_heads, num_kv_heads, head_dim = 6, 4, 2, 64
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv_heads, head_dim, device=device)  # [T, H + 2 Hkv, D]
    key = qkv[:, num_heads : num_heads + num_kv_heads]
    value = qkv[:, num_heads + num_kv_heads :]
    cache = torch.randn(2, 3, 16, num_kv_heads, head_dim, device=device)
    slots = torch.tensor([47, 0, 16, 5, 31, 32], device=device)
    expected = cache.clone()
    write_kv_cache_reference(key, value, expected, slots)
    write_kv_cache(key, value, cache, slots)
    assert torch.equal(cache, expected)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda k, v, c, s: (k, v[:, :1], c, s), "value shape"),
        (lambda k, v, c, s: (k, v, c, s[:-1]), "slot_mapping has"),
        (lambda k, v, c, s: (k, v, c, s.float()), "slot_mapping must have dtype"),
        (lambda k, v, c, s: (k, v, c.transpose(1, 2), s), "kv_cache must be contiguous"),
        (lambda k, v, c, s: (k[..., :32], v[..., :32], c, s), "head_dim"),
        (lambda k, v, c, s: (k[:, :1], v[:, :1], c, s), "KV heads"),
        (lambda k, v, c, s: (k.int(), v, c, s), "key must have dtype"),
    ],
)
def test_write_rejects_bad_inputs(change, message):
    inputs = _scatter_inputs(4, 2, 64, 16, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=message):
        write_kv_cache(*change(*inputs))


def test_write_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        write_kv_cache(*_scatter_inputs(4, 2, 64, 16, torch.float32, torch.float32))
