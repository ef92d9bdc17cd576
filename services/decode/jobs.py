"""What one Decode call is on the decode worker (`DecodeJob`), what its stream carries (`TokenBatch`*,
then one `DecodeFinal`, or an error), and how queued stream items are merged when the writer is behind.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


from common.engine.kv_reservation import KVReservation
from common.engine.sampling_params import SamplingParams
from common.engine.sequence import TokenLogprobs
from common.kv.kv_pool import TransferBuffer
from common.transfer.base import TransferTicket
from common.transfer.handle import KVHandle, TransferStats
from services.common.engine_thread import AsyncSink


@dataclass
class TokenBatch:
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None  # one per token id when the request asked for logprobs


@dataclass
class DecodeFinal:
    finish_reason: str  # "stop" | "length"
    num_generated_tokens: int  # token #1 included
    transfer: TransferStats | None
    matched_stop_token_id: int | None


@dataclass
class DecodeJob:
    request_id: str
    prompt_token_ids: list[int]
    first_token_id: int | None  # token #1 from the prefill worker; None when this worker samples it
    sampling: SamplingParams
    handle: KVHandle | None  # where to pull the prompt's KV; None when the worker prefills it (prefill_here)
    sink: AsyncSink | None = None  # TokenBatch* then DecodeFinal, or an exception; set when the call starts
    # time.monotonic() when the Decode call arrived: admission timeout, TTFT and e2e latency start here
    enqueued_at: float = field(default_factory=time.monotonic)
    enqueued_at_ns: int = field(default_factory=time.time_ns)  # wall clock, for the decode.queue span
    block_hashes: list[bytes] | None = None  # the prompt's full blocks' hashes, checked against the handle's
    reservation: KVReservation | None = None  # reserved blocks (reused ones first), once admitted
    ticket: TransferTicket | None = None
    buffer: TransferBuffer | None = None  # [L, 2, n, BS, Hkv, D] the pull lands in (n: the blocks pulled)
    transfer: TransferStats | None = None
    num_generated_tokens: int = 1  # token #1 included: 0 to start with when the worker prefills it
    last_token_id: int | None = None
    last_token_at: float | None = None  # time.monotonic() of the latest streamed token (TTFT, then ITL)
    is_aborted: bool = False  # Abort came while its transfer was in flight
    is_finished: bool = False  # its final message or error has been handed to the sink
    trace_parent: Any = None  # the Decode RPC's trace context, parent of this request's spans
    kv_recv_span: Any = None  # open while the KV is being pulled
    generate_span: Any = None  # open while the request decodes
    is_prefill_here: bool = False  # the worker computes the prompt (no handle, token #1 streams from here)


@dataclass
class DecodeLimits:
    max_num_admitting: int = 1024  # hand-offs waiting for KV blocks before RESOURCE_EXHAUSTED
    admission_timeout_seconds: float = 30.0  # longest wait for free KV blocks
    # KV bytes being pulled at once: each pull lands in a buffer of its own before it is scattered into
    # the pool, outside the pool's memory budget; past this, hand-offs wait their turn (one always runs)
    max_receiving_bytes: int = 2 << 30

    def __post_init__(self) -> None:
        if self.max_num_admitting < 1:
            raise ValueError(f"max_num_admitting: must be >= 1, got {self.max_num_admitting}")
        if self.max_receiving_bytes < 1:
            raise ValueError(f"max_receiving_bytes: must be >= 1, got {self.max_receiving_bytes}")
        if self.admission_timeout_seconds <= 0:
            raise ValueError(f"admission_timeout_seconds: must be > 0, got {self.admission_timeout_seconds}")


def coalesce(items: list) -> list:
    """Merges each run of consecutive TokenBatch items into one; other items (the final) stay in place.

    Order is kept and logprobs stay one per token: batches with and without logprobs are never merged.
    """
    if len(items) < 2:
        return items
    merged: list = []
    token_ids: list[int] | None = None  # the run being merged
    logprobs: list[TokenLogprobs] | None = None
    for item in items:
        if isinstance(item, TokenBatch):
            if token_ids is not None and (item.logprobs is None) == (logprobs is None):
                token_ids.extend(item.token_ids)
                if logprobs is not None:
                    logprobs.extend(item.logprobs)
                continue
            if token_ids is not None:
                merged.append(TokenBatch(token_ids, logprobs))
            token_ids = list(item.token_ids)
            logprobs = None if item.logprobs is None else list(item.logprobs)
            continue
        if token_ids is not None:
            merged.append(TokenBatch(token_ids, logprobs))
            token_ids = logprobs = None
        merged.append(item)
    if token_ids is not None:
        merged.append(TokenBatch(token_ids, logprobs))
    return merged
