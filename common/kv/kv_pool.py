"""The paged KV pool: one tensor per worker, every layer's attention reads a view of it.

    kv: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]     (2 = K, V)
    kv[i]: [2, num_blocks, block_size, num_kv_heads, head_dim], the view layer i's attention reads

`gather_blocks` / `scatter_blocks` move a request's blocks to and from one contiguous buffer
[num_layers, 2, n, block_size, num_kv_heads, head_dim]: that buffer is what the KV hand-off sends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.kv.layout import KVLayout


def num_blocks_for_budget(layout: KVLayout, memory_bytes: int) -> int:
    """How many blocks fit in `memory_bytes`."""
    if memory_bytes < 0:
        raise ValueError(f"KV cache memory must be >= 0 bytes, got {memory_bytes}")
    return memory_bytes // layout.bytes_per_block


@dataclass(frozen=True)
class TransferBuffer:
    """Where a KV transfer lands: `tensor`, writable outside stream order once `is_ready()`."""

    tensor: torch.Tensor  # [num_layers, 2, n, block_size, Hkv, D]
    ready: "torch.cuda.Event | None"  # completes when no kernel queued before the allocation can touch it

    def is_ready(self) -> bool:
        return self.ready is None or self.ready.query()


class KVPool:
    """Owns the single KV tensor; block ids come from `BlockAllocator`."""

    def __init__(self, layout: KVLayout, num_blocks: int, device: torch.device | str = "cpu"):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.layout = layout
        self.num_blocks = num_blocks
        self.device = torch.device(device)
        # Zeroed so that reading a padded (never written) slot can never produce NaN/Inf.
        self.kv = torch.zeros(layout.block_shape(num_blocks), dtype=layout.torch_dtype, device=self.device)
        self._gather_stream: torch.cuda.Stream | None = None  # CUDA: created by the first gather

    @property
    def num_bytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def gather_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Copies the given blocks out: [num_layers, 2, len(block_ids), block_size, Hkv, D], contiguous,
        complete when this returns (`start_gather` without the wait)."""
        gathered = self.start_gather(block_ids)
        if gathered.ready is not None:
            gathered.ready.synchronize()
        return gathered.tensor

    def start_gather(self, block_ids: list[int]) -> TransferBuffer:
        """Queues the copy of the given blocks out ([num_layers, 2, len(block_ids), block_size, Hkv, D],
        contiguous); read it outside stream order (UCX does) only once `is_ready()`.

        On CUDA it runs on a side stream of its own: a hand-off never waits for the forward passes
        queued on the compute stream. That is safe because the blocks it reads were written by a
        step that already finished (its sampled token was read back before the blocks were offered).
        The side stream has the highest priority, so its small copies take the SMs as soon as a
        running kernel frees them instead of queueing behind a whole prefill forward, and nothing here
        makes the host wait: a sender serving many pulls keeps serving while their copies run.
        """
        if self.device.type != "cuda":
            return TransferBuffer(self.kv.index_select(2, self._index(block_ids)), None)
        stream = self._copy_stream()
        with torch.cuda.stream(stream):
            index = self._index(block_ids)
            gathered = self.kv.index_select(2, index)
            ready = torch.cuda.Event()
            ready.record(stream)
        return TransferBuffer(gathered, ready)

    def _copy_stream(self) -> "torch.cuda.Stream":
        if self._gather_stream is None:
            # non-blocking: no implicit sync with stream 0; a priority past the device's range means its highest
            self._gather_stream = torch.cuda.Stream(self.device, priority=-(1 << 10))
        return self._gather_stream

    def new_transfer_buffer(self, num_blocks: int) -> "TransferBuffer":
        """An uninitialised [num_layers, 2, num_blocks, block_size, Hkv, D] buffer for KV bytes that a
        transport writes outside stream order; write into it only once `is_ready()`.

        It comes from the current stream's memory, which kernels queued before this call may still be
        using: an event recorded now completes once they have all run. The host never waits for it (a
        wait here would stall the engine thread behind the steps in flight); the caller polls instead.
        """
        tensor = torch.empty(self.layout.block_shape(num_blocks), dtype=self.layout.torch_dtype, device=self.device)
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        return TransferBuffer(tensor, ready)

    def scatter_blocks(self, block_ids: list[int], data: torch.Tensor) -> None:
        """Writes `data` [num_layers, 2, len(block_ids), block_size, Hkv, D] into the given blocks.

        Queued on the current stream; the host does not wait for it (nor for anything queued before it).
        """
        expected = self.layout.block_shape(len(block_ids))
        if tuple(data.shape) != expected:
            raise ValueError(f"KV data has shape {tuple(data.shape)}, expected {expected}")
        if data.dtype != self.layout.torch_dtype:
            raise ValueError(f"KV data has dtype {data.dtype}, expected {self.layout.torch_dtype}")
        self.kv.index_copy_(2, self._index(block_ids), data.to(self.device))

    def _index(self, block_ids: list[int]) -> torch.Tensor:
        """The block ids as a device tensor for the current stream, copied without making the host wait:
        a plain host-to-device copy from pageable memory would wait for every kernel queued before it."""
        for block_id in block_ids:
            if not 0 <= block_id < self.num_blocks:
                raise ValueError(f"block id {block_id} is outside 0..{self.num_blocks - 1}")
        index = torch.tensor(block_ids, dtype=torch.int64)
        if self.device.type != "cuda":
            return index
        return index.pin_memory().to(self.device, non_blocking=True)
