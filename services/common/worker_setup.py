"""What both workers need around their engine: the KV layout, model facts, stats, the transfer backend."""

from __future__ import annotations

import logging
import os
import sys

from common import transfer
from common.kv.layout import KVLayout
from common.transfer.ucx_runtime import UcxRuntime, prefer_busy_progress
from services.common.worker_messages import WorkerStatsData

logger = logging.getLogger(__name__)

TRANSFER_BACKENDS = transfer.BACKENDS

# Triton compiles in this process when its worker was about to report SERVING (None: not yet).
_num_compiles_at_ready: int | None = None


def kv_layout(engine) -> KVLayout:
    """The engine's KV pool layout, as the transfer layer checks it (model name included)."""
    return engine.kv_pool.layout


def model_facts(engine) -> dict:
    """The model facts a worker reports in GetStats (the frontend validates requests with them)."""
    return {
        "max_model_len": engine.max_model_len,
        "vocab_size": engine.model_config.vocab_size,
        "eos_token_ids": sorted(engine.model_config.eos_token_ids),
    }


def refresh_worker_stats(role: str, engine_stats, metrics, counters: dict[str, int], layout: KVLayout,
                         facts: dict, num_waiting: int, **role_fields) -> WorkerStatsData:
    """What GetStats reports after one engine step; also sets the queue and KV usage gauges.

    `num_waiting` counts the worker's own queues too; `role_fields` are the role's extra stats.
    """
    stats = WorkerStatsData(
        role=role,
        is_ready=True,
        num_running=engine_stats.num_running,
        num_waiting=num_waiting,
        num_free_blocks=engine_stats.num_free_blocks,
        num_total_blocks=engine_stats.num_total_blocks,
        kv_cache_usage=engine_stats.kv_cache_usage,
        num_requests_served=counters["served"],
        num_transfers=counters["transfers"],
        num_transfer_bytes=counters["bytes"],
        num_transfer_failures=counters["failures"],
        num_generated_tokens=engine_stats.generation_tokens_total,
        num_kernel_compiles_after_ready=num_kernel_compiles_after_ready(),
        layout=layout,
        **facts,
        **role_fields,
    )
    metrics.set_queue_sizes(stats.num_running, stats.num_waiting)
    metrics.set_kv_usage(stats.num_used_blocks, stats.num_total_blocks)
    metrics.set_prefix_cache_totals(engine_stats.prefix_cache_queries_tokens, engine_stats.prefix_cache_hits_tokens)
    return stats


def warm_up_kernels(engine) -> None:
    """Runs every kernel variant serving can hit (common.engine.warmup), then takes the compile count
    `num_kernel_compiles_after_ready` counts from. Call it once the engine is loaded, before anything
    else uses it; no kernel runs between it and the worker reporting SERVING."""
    global _num_compiles_at_ready
    from common.engine.warmup import warm_up

    warm_up(engine)
    _num_compiles_at_ready = _num_kernel_compiles()


def num_kernel_compiles_after_ready() -> int:
    """Triton variants compiled since `warm_up_kernels` ran, i.e. since the worker reported SERVING
    (every compile so far when it never ran; 0 on CPU).

    Triton's JIT caches are per process, so two workers sharing a process (tests) share the count.
    """
    return _num_kernel_compiles() - (_num_compiles_at_ready or 0)


def _num_kernel_compiles() -> int:
    launch_utils = sys.modules.get("kernels.launch_utils")  # not imported: no kernel was ever launched
    return launch_utils.num_compiled_variants() if launch_utils is not None else 0


async def load_engine(config):
    """Loads the model off the event loop (so health probes are answered meanwhile)."""
    import asyncio

    import torch

    from common.engine.llm_engine import LLMEngine

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    engine = await asyncio.to_thread(LLMEngine, config)
    if engine.device.type == "cuda":  # before the KV transport starts UCX
        prefer_busy_progress()
        UcxRuntime.bind_cuda_device(engine.device.index if engine.device.index is not None
                                    else torch.cuda.current_device())
    return engine


def _warn_if_fake(backend: str) -> None:
    if backend == "fake":
        logger.warning("KV transfer backend 'fake' only reaches workers in this same process (tests)")


def create_sender(backend: str, layout: KVLayout, gather_blocks, on_release, host: str, port: int):
    """The prefill worker's KV sender (common.transfer's factory)."""
    _warn_if_fake(backend)
    return transfer.create_sender(backend, layout, gather_blocks, on_release, host=host, port=port)


def create_receiver(backend: str, layout: KVLayout, timeout_seconds: float):
    """The decode worker's KV receiver (common.transfer's factory)."""
    _warn_if_fake(backend)
    return transfer.create_receiver(backend, layout, timeout_seconds=timeout_seconds)
