"""Attention over the paged KV pool, dispatched to a backend chosen once per process.

`reference` is the pure-PyTorch path (CPU, tests); `triton` runs the kernels in `kernels/`
(CUDA, or the Triton interpreter on CPU when TRITON_INTERPRET=1).
"""

from __future__ import annotations

from common.attention.metadata import AttentionMetadata
from common.attention.backend import AttentionBackend, get_attention_backend

__all__ = ["AttentionMetadata", "AttentionBackend", "get_attention_backend"]
