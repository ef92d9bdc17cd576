"""Decode steps replayed from CUDA graphs: one graph per (padded batch size, context bucket).

A decode step of an 8B model launches ~400 kernels; eagerly, Python launch overhead rivals the
step's memory-bound GPU time at small batches. A graph replays them with one launch.

Batch sizes are padded up a ladder (1, 2, 4, 8, 16, 24, 32, 48, 64, then every 16), capped by
`max_num_seqs` and `cuda_graph_max_batch_size`; larger batches run eagerly. Padding rows are
harmless (see `decode_inputs`). All graphs share one memory pool, captured largest first, and write
logits into one shared buffer, so the pool holds one step's temporaries, not one per graph.

The split-KV decode kernel fixes its partition plan from `metadata.max_context_len` at launch,
i.e. at capture. A graph captured with plan length L is correct for every context <= L (partitions
past a context exit at once). Each batch size is captured at context buckets (1024, 2048, ... up
to max_model_len), keeping only buckets where the kernel's plan changes; a step replays the
smallest bucket that holds its longest context:

    batch 1, H100, 8 KV heads:  bucket 1024 -> 4 splits x 256 tokens ... 131072 -> 64 splits x 2048
    batch 64:                   one bucket (the grid already fills the GPU: no split at any length)
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Callable, Hashable

import torch

from common.attention import AttentionMetadata
from common.engine.decode_inputs import DecodeBatch, DecodeInputBuffers, field_views
from common.kv.block_count import num_blocks_for

logger = logging.getLogger(__name__)

LADDER_HEAD = (1, 2, 4, 8, 16, 24, 32, 48, 64)
LADDER_STEP = 16  # past the head, every 16 sequences
SMALLEST_CONTEXT_BUCKET = 1024


def capture_batch_sizes(max_num_seqs: int, max_capture_size: int) -> list[int]:
    """Ascending batch sizes to capture: the ladder up to min(max_num_seqs, max_capture_size), which
    is always included."""
    if max_num_seqs < 1 or max_capture_size < 1:
        raise ValueError(f"max_num_seqs and max_capture_size must be >= 1, got {max_num_seqs}, {max_capture_size}")
    limit = min(max_num_seqs, max_capture_size)
    sizes = [size for size in LADDER_HEAD if size <= limit]
    sizes += range(LADDER_HEAD[-1] + LADDER_STEP, limit + 1, LADDER_STEP)
    if sizes[-1] != limit:
        sizes.append(limit)
    return sizes


def padded_batch_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest captured size >= num_seqs, or None when the batch is too big for any graph."""
    index = bisect.bisect_left(sizes, num_seqs)
    return sizes[index] if index < len(sizes) else None


def context_buckets(max_model_len: int, smallest: int = SMALLEST_CONTEXT_BUCKET) -> list[int]:
    """Ascending plan lengths: smallest, 2 x smallest, ... below max_model_len, then max_model_len."""
    buckets = []
    length = smallest
    while length < max_model_len:
        buckets.append(length)
        length *= 2
    return buckets + [max_model_len]


def distinct_plan_buckets(buckets: list[int], plan_of: Callable[[int], Hashable]) -> list[int]:
    """Of ascending buckets, the largest of each run with the same plan (it covers the run's contexts)."""
    kept = []
    for index, bucket in enumerate(buckets):
        is_last = index == len(buckets) - 1
        if is_last or plan_of(bucket) != plan_of(buckets[index + 1]):
            kept.append(bucket)
    return kept


def select_bucket(max_context_len: int, buckets: list[int]) -> int:
    """The smallest bucket holding `max_context_len` (buckets ascending, the last >= any context)."""
    index = bisect.bisect_left(buckets, max_context_len)
    if index == len(buckets):
        raise ValueError(f"context of {max_context_len} tokens exceeds the largest captured plan {buckets[-1]}")
    return buckets[index]


def decode_split_plan(num_seqs: int, num_kv_heads: int, plan_context_len: int, num_sms: int) -> Hashable:
    """(num_splits, partition_size) the Triton decode kernel picks for this batch and plan length."""
    from kernels.paged_decode_attention import choose_num_splits, plan_partitions

    num_splits = choose_num_splits(num_seqs, num_kv_heads, plan_context_len, num_sms)
    partition_size, num_splits = plan_partitions(plan_context_len, num_splits)
    return (1, None) if num_splits == 1 else (num_splits, partition_size)


class DecodeForward:
    """The decode forward shared by eager steps and graph capture: inputs -> logits of every row."""

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, buffers: DecodeInputBuffers, vocab_size: int):
        self.model = model
        self.kv_cache = kv_cache
        self.buffers = buffers
        device = buffers.device
        self.query_start_locs = torch.arange(buffers.max_num_seqs + 1, dtype=torch.int32, device=device)
        # Shared by every graph and eager step: [max_num_seqs, V] fp32, rows past a step's batch are stale.
        self.logits = torch.empty(buffers.max_num_seqs, vocab_size, dtype=torch.float32, device=device)

    def __call__(self, num_rows: int, plan_context_len: int) -> torch.Tensor:  # -> [num_rows, V] fp32
        """Runs the rows currently in the buffers; attention plans for contexts up to plan_context_len."""
        input_ids, positions, slot_mapping, context_lens, table_rows = field_views(self.buffers.flat, num_rows)
        width = num_blocks_for(plan_context_len, self.buffers.block_size)
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping,
            query_start_locs=self.query_start_locs[: num_rows + 1],
            context_lens=context_lens.to(torch.int32),
            block_tables=self.buffers.tables[:, :width].index_select(0, table_rows),  # [num_rows, width]
            max_query_len=1,
            max_context_len=plan_context_len,
            is_decode=True,
        )
        hidden = self.model(input_ids, positions, self.kv_cache, metadata)  # [num_rows, hidden]
        return self.model.compute_logits(hidden, out=self.logits[:num_rows])


class CUDAGraphRunner:
    """Captures `DecodeForward` per (batch size, context bucket) and replays it for a prepared batch.

    `capture=False` keeps every decision (padding, buckets, plans) but runs the forward eagerly at
    replay: the same code path without a GPU, for tests on CPU.
    """

    def __init__(self, forward: DecodeForward, batch_sizes: list[int], max_model_len: int,
                 plan_of: Callable[[int, int], Hashable], capture: bool = True):
        self.forward = forward
        self.batch_sizes = sorted(batch_sizes)
        self.max_model_len = max_model_len
        self.is_captured = capture
        all_buckets = context_buckets(max_model_len)
        self.buckets = {size: distinct_plan_buckets(all_buckets, lambda length, size=size: plan_of(size, length))
                        for size in self.batch_sizes}
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        if capture:
            self._capture_all()

    @property
    def num_graphs(self) -> int:
        return sum(len(buckets) for buckets in self.buckets.values())

    def padded_size(self, num_seqs: int) -> int | None:
        return padded_batch_size(num_seqs, self.batch_sizes)

    def replay(self, batch: DecodeBatch) -> torch.Tensor:  # -> [batch.num_rows, V] fp32
        """Logits of every row of a batch prepared at a captured size (rows past num_seqs are padding)."""
        if batch.num_rows not in self.buckets:
            raise ValueError(f"no graph for {batch.num_rows} rows (captured: {self.batch_sizes})")
        bucket = select_bucket(batch.max_context_len, self.buckets[batch.num_rows])
        if not self.is_captured:
            return self.forward(batch.num_rows, bucket)
        self._graphs[(batch.num_rows, bucket)].replay()
        return self.forward.logits[: batch.num_rows]

    @torch.inference_mode()
    def _capture_all(self) -> None:
        start = time.perf_counter()
        with torch.cuda.device(self.forward.buffers.device):
            pool = torch.cuda.graph_pool_handle()
            for size in reversed(self.batch_sizes):  # largest first: later graphs fit in its memory
                for bucket in reversed(self.buckets[size]):
                    self._graphs[(size, bucket)] = self._capture_one(size, bucket, pool)
            torch.cuda.synchronize()
        logger.info("captured %d decode CUDA graphs (batch sizes %s) in %.1f s", len(self._graphs),
                    self.batch_sizes, time.perf_counter() - start)

    def _capture_one(self, num_rows: int, bucket: int, pool) -> torch.cuda.CUDAGraph:
        self.forward.buffers.fill_padding(num_rows)
        self.forward(num_rows, bucket)  # warm-up: compiles the kernels this shape and plan need
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls of other threads (a service's transfer or RPC threads) do not
        # invalidate this capture; the engine itself is single-threaded.
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            self.forward(num_rows, bucket)
        return graph
