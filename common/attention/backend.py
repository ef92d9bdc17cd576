"""Picks the attention implementation: PyTorch reference on CPU, Triton kernels on CUDA."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from common.attention.metadata import AttentionMetadata
from kernels.reference import paged_attention_reference, write_kv_cache_reference

BACKEND_NAMES = ("auto", "reference", "triton")


@dataclass(frozen=True)
class AttentionBackend:
    name: str
    # (key [T,Hkv,D], value [T,Hkv,D], kv_cache [2,NB,BS,Hkv,D], slot_mapping [T]) -> None
    write_kv_cache: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]
    # (query [T,H,D], kv_cache, metadata, scale) -> [T,H,D]
    paged_attention: Callable[[torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]


REFERENCE = AttentionBackend("reference", write_kv_cache_reference, paged_attention_reference)


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    """`auto` means Triton on CUDA and the reference elsewhere."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"attention backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name == "reference" or (name == "auto" and device.type != "cuda"):
        return REFERENCE
    from kernels.dispatch import TRITON  # imported lazily: Triton is only needed on this path

    return TRITON
