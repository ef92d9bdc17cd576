"""The KV layout: the shape and type of a worker's paged KV pool, and what two workers must agree on
before KV blocks can move between them.

    pool:      [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]     (2 = K, V)
    transfer:  the same with num_blocks = the blocks moved (`block_shape(n)`)

One dataclass serves the pool, the KV hand-off and the services' messages; protobuf
(`protos/kv_layout.proto`) meets it only at the edges (`common/transfer/protocol.py`). It holds the
dtype by name so that a process without torch (the frontend) can read a worker's layout.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Element types a KV pool may hold, by torch's name, and their size in bytes.
KV_DTYPE_BYTES = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
}
_INT_FIELDS = ("block_size", "num_layers", "num_kv_heads", "head_dim")


@dataclass(frozen=True)
class KVLayout:
    """Shape and type of a paged KV pool; two workers can hand off KV only if these match."""

    model_name: str  # served model, so two different models never exchange KV
    dtype: str  # element type by torch's name, e.g. "float16"; a torch.dtype is accepted and stored by name
    block_size: int  # tokens per block
    num_layers: int  # decoder layers holding KV
    num_kv_heads: int  # K/V heads per layer
    head_dim: int  # channels per head

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name: must not be empty")
        object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        if self.dtype not in KV_DTYPE_BYTES:
            raise ValueError(f"dtype: must be one of {sorted(KV_DTYPE_BYTES)}, got {self.dtype!r}")
        for name in _INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")

    @property
    def torch_dtype(self) -> "torch.dtype":
        import torch  # only the processes that hold KV need torch

        return getattr(torch, self.dtype)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V."""
        elements = 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim
        return elements * KV_DTYPE_BYTES[self.dtype]

    def block_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of `num_blocks` blocks: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""
        return (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def describe_mismatch(self, other: "KVLayout", self_name: str = "this", other_name: str = "other") -> str:
        """Empty when equal, else e.g. "block_size: prefill=16 decode=32; head_dim: prefill=64 decode=128"."""
        diffs = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                diffs.append(f"{f.name}: {self_name}={mine} {other_name}={theirs}")
        return "; ".join(diffs)
