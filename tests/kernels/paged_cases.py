"""Builds paged-KV test cases the way the engine fills the pool, and compares against references.

`build_paged_case` uses scattered block ids (block 0 is only ever table padding), random K/V, and
NaN in every slot no sequence owns, so a kernel that reads outside a context (tail of its last
block, padded table entries) produces NaN. Inputs are drawn on the CPU and moved to the case's
device, so a CUDA case holds exactly the values of its CPU sibling; the reference always runs in
float32 on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.attention.metadata import AttentionMetadata
from kernels.paged_decode_attention import paged_decode_attention
from kernels.prefill_attention import prefill_attention
from kernels.reference import decode_attention_reference, prefill_attention_reference


@dataclass
class PagedCase:
    query: torch.Tensor  # [num_tokens, num_heads, head_dim] on the case's device
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim], unowned slots NaN
    clean_kv_cache: torch.Tensor  # CPU: same values with finite unowned slots (the reference needs them)
    metadata: AttentionMetadata  # on the case's device
    scale: float
    cpu_metadata: AttentionMetadata  # the same step on the CPU, for the reference

    def reference(self) -> torch.Tensor:  # [num_tokens, num_heads, head_dim] float32, CPU
        """The float32 PyTorch reference on the CPU, from the (possibly rounded) inputs."""
        query = self.query.detach().float().cpu()
        kv_cache, metadata = self.clean_kv_cache.float(), self.cpu_metadata
        if metadata.is_decode:
            return decode_attention_reference(query, kv_cache, metadata.block_tables, metadata.context_lens,
                                              metadata.max_context_len, self.scale)
        return prefill_attention_reference(query, kv_cache, metadata.block_tables, metadata.query_start_locs_cpu,
                                           metadata.context_lens_cpu, self.scale)


def build_paged_case(
    query_lens: list[int],
    context_lens: list[int],
    *,
    head_dim: int,
    num_kv_heads: int,
    group: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: torch.device | str = "cpu",
    num_decode_seqs: int = 0,  # > 0: a mixed step (the kernels' metadata only; the reference sees one packed step)
) -> PagedCase:
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-context_len // block_size) for context_len in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # a few spare blocks stay unowned
    block_ids = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()  # never block 0
    block_tables, cursor = [], 0
    for count in blocks_per_seq:
        block_tables.append(block_ids[cursor : cursor + count])
        cursor += count
    metadata = AttentionMetadata.build(query_lens, context_lens, block_tables, block_size, device=device,
                                       num_decode_seqs=num_decode_seqs)
    cpu_metadata = AttentionMetadata.build(query_lens, context_lens, block_tables, block_size)

    shape = (2, num_blocks, block_size, num_kv_heads, head_dim)
    clean = torch.randn(shape, generator=generator).to(dtype)
    is_owned = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for table, context_len in zip(block_tables, context_lens):
        positions = torch.arange(context_len)
        is_owned[torch.tensor(table)[positions // block_size] * block_size + positions % block_size] = True
    poisoned = clean.clone()
    poisoned.view(2, num_blocks * block_size, num_kv_heads, head_dim)[:, ~is_owned] = float("nan")
    query = torch.randn(sum(query_lens), num_kv_heads * group, head_dim, generator=generator).to(dtype)
    return PagedCase(query.to(device), poisoned.to(device), clean, metadata, head_dim**-0.5, cpu_metadata)


def decode_context_lens(block_size: int) -> list[int]:
    """Ragged: a 1-token context, contexts ending exactly on a block boundary, and odd ones."""
    return [1, block_size, 2 * block_size + 3, 3 * block_size, block_size + 1]


def assert_matches_reference(out: torch.Tensor, reference: torch.Tensor) -> None:
    """fp32: tight elementwise; fp16/bf16 against an fp32 reference: relative error < 1e-2."""
    out, reference = out.cpu(), reference.cpu()
    assert out.shape == reference.shape
    assert not torch.isnan(out).any(), "output has NaN (unwritten rows or reads outside a context)"
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, reference, atol=2e-5, rtol=1e-4)
        return
    error = (out.float() - reference.float()).norm() / reference.float().norm()
    assert error < 1e-2, f"relative error {error:.2e}"
    torch.testing.assert_close(out.float(), reference.float(), atol=4e-2, rtol=4e-2)


def run_decode(case: PagedCase, query: torch.Tensor | None = None, **options) -> torch.Tensor:
    """The decode kernel on the case (or on `query` in its place), fed from the case's metadata."""
    metadata = case.metadata
    return paged_decode_attention(case.query if query is None else query, case.kv_cache, metadata.block_tables,
                                  metadata.context_lens, metadata.max_context_len, case.scale, **options)


def run_prefill(case: PagedCase, query: torch.Tensor | None = None, **options) -> torch.Tensor:
    """The prefill kernel on the case (or on `query` in its place), fed from the case's metadata."""
    metadata = case.metadata
    return prefill_attention(case.query if query is None else query, case.kv_cache, metadata.block_tables,
                             metadata.query_start_locs, metadata.context_lens, metadata.max_query_len, case.scale,
                             **options)


def run_against_reference(run_kernel, case, **kwargs) -> None:
    """Runs `run_kernel(case, out=...)` (`run_decode` or `run_prefill`) into a NaN-poisoned output and
    checks it against the PyTorch reference (every element written, values matching)."""
    out = torch.full_like(case.query, float("nan"))
    result = run_kernel(case, out=out, **kwargs)
    assert result is out
    assert_matches_reference(out, case.reference())
