"""What both workers need around their engine: the KV layout, model facts, the transfer backend."""

from __future__ import annotations

import logging
import os

from common import transfer
from common.transfer import KVLayout

logger = logging.getLogger(__name__)

TRANSFER_BACKENDS = transfer.BACKENDS


def kv_layout(engine) -> KVLayout:
    """The engine's KV pool layout as the transfer layer checks it (model name included)."""
    return KVLayout.from_pool(engine.kv_pool.layout, engine.model_name)


def model_facts(engine) -> dict:
    """The model facts a worker reports in GetStats (the frontend validates requests with them)."""
    return {
        "max_model_len": engine.max_model_len,
        "vocab_size": engine.model_config.vocab_size,
        "eos_token_ids": sorted(engine.model_config.eos_token_ids),
    }


async def load_engine(config):
    """Loads the model off the event loop (so health probes are answered meanwhile)."""
    import asyncio

    import torch

    from common.engine.llm_engine import LLMEngine

    if os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    return await asyncio.to_thread(LLMEngine, config)


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
