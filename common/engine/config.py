"""Typed, validated engine settings; parsed from the command line only in `args.py`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.engine.kv_budget import KV_ROLES
from common.model.formats import DTYPE_NAMES, LOAD_FORMATS

DTYPES = ("auto", *DTYPE_NAMES)
ATTENTION_BACKENDS = ("auto", "reference", "triton")
DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30  # 1 GiB when nothing else says how big the CPU pool is


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass
class EngineConfig:
    model: str | None = None  # HF folder, .gguf file or "dummy:<preset>"; None = embedded SmolLM2
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    dtype: str = "auto"  # auto = float32 on CPU; on CUDA the checkpoint's dtype (bfloat16 for fp32 ones)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    block_size: int = 16  # tokens per KV block
    max_num_seqs: int = 256  # most sequences decoded together
    max_num_batched_tokens: int = 8192  # most new tokens in one step (decode tokens and prompt chunks)
    max_model_len: int | None = None  # prompt + output cap; None = the model's max_position_embeddings
    kv_cache_memory_bytes: int | None = None  # KV pool size on CPU (default 1 GiB)
    # share of the GPU's total memory THIS process may use (weights, activations, KV pool, CUDA graphs,
    # CUDA context), whatever other processes on the GPU hold
    gpu_memory_utilization: float = 0.9
    num_kv_blocks: int | None = None  # explicit pool size in blocks; overrides the budgets above and the cap
    max_num_kv_tokens: int | None = None  # cap: at most this many tokens of KV; None = kv_role's default
    kv_role: str = "kv_both"  # kv_producer (prefill worker): default cap = what it holds; others: no cap
    attention_backend: str = "auto"  # auto (Triton on CUDA, reference on CPU) | reference | triton
    seed: int = 0  # seeds the generator shared by requests without a seed of their own
    enforce_eager: bool = False  # CUDA: run decode steps eagerly instead of replaying CUDA graphs
    cuda_graph_max_batch_size: int = 512  # largest decode batch captured in a CUDA graph (bigger: eager)
    # plan and launch decode step N+1 while step N runs on the device (the host's work hides behind it)
    async_scheduling: bool = True
    # reuse the KV of full blocks an earlier request computed for the same prefix (vLLM's flag)
    enable_prefix_caching: bool = True
    # one token budget per step (vLLM's flag): running decodes first, then chunks of waiting prompts fill the
    # rest, so a prompt never stalls running decodes. False: a step is all prefill or all decode, prefill
    # first (prompts longer than max_num_batched_tokens are still split into chunks)
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        self._check_choice("load_format", LOAD_FORMATS)
        self._check_choice("dtype", DTYPES)
        self._check_choice("attention_backend", ATTENTION_BACKENDS)
        self._check_choice("kv_role", KV_ROLES)
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"model must be a non-empty string or None, got {self.model!r}")
        if not isinstance(self.device, str) or not _is_valid_device(self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        self._check_positive("block_size")
        self._check_positive("max_num_seqs")
        self._check_positive("max_num_batched_tokens")
        self._check_positive("max_model_len", is_optional=True)
        self._check_positive("num_kv_blocks", is_optional=True)
        self._check_positive("max_num_kv_tokens", is_optional=True)
        if self.kv_cache_memory_bytes is not None and (
            not _is_int(self.kv_cache_memory_bytes) or self.kv_cache_memory_bytes <= 0
        ):
            raise ValueError(f"kv_cache_memory_bytes must be a positive int, got {self.kv_cache_memory_bytes!r}")
        utilization = self.gpu_memory_utilization
        if not isinstance(utilization, (int, float)) or isinstance(utilization, bool) or not 0 < utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization!r}")
        if not _is_int(self.seed):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.enforce_eager, bool):
            raise ValueError(f"enforce_eager must be a bool, got {self.enforce_eager!r}")
        self._check_positive("cuda_graph_max_batch_size")
        if not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be a bool, got {self.async_scheduling!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValueError(f"enable_chunked_prefill must be a bool, got {self.enable_chunked_prefill!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        device = torch.device(self.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device is {self.device!r} but CUDA is not available")
        return device

    def _check_choice(self, name: str, choices: tuple[str, ...]) -> None:
        if getattr(self, name) not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {getattr(self, name)!r}")

    def _check_positive(self, name: str, is_optional: bool = False) -> None:
        value = getattr(self, name)
        if value is None and is_optional:
            return
        if not _is_int(value) or value <= 0:
            raise ValueError(f"{name} must be a positive int{' or None' if is_optional else ''}, got {value!r}")


def _is_valid_device(name: str) -> bool:
    if name in ("auto", "cpu", "cuda"):
        return True
    prefix, _, index = name.partition(":")
    return prefix == "cuda" and index.isdigit()
