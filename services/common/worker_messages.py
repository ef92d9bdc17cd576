"""worker.proto <-> domain objects; the one edge where protobuf meets the workers' dataclasses.

Both sides of the internal API use it: the frontend packs requests (`*_to_pb`) and the workers unpack
them (`*_from_pb`). Nothing past this module sees a worker protobuf message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.engine.sampling_params import ENGINE_FIELDS, SamplingParams
from common.engine.sequence import TokenLogprobs
from common.kv.layout import KVLayout
from common.transfer.handle import KVHandle, TransferStats
from common.transfer.protocol import layout_from_pb, layout_to_pb
from protos import worker_pb2

FINISH_REASON_TO_PB = {
    None: worker_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": worker_pb2.FINISH_REASON_STOP,
    "length": worker_pb2.FINISH_REASON_LENGTH,
}
FINISH_REASON_FROM_PB = {value: key for key, value in FINISH_REASON_TO_PB.items()}


# The fields worker.proto's SamplingParams carries, from the table of sampling parameters.
_WORKER_SAMPLING_FIELDS = tuple(row for row in ENGINE_FIELDS if row.worker is not None)


def sampling_to_pb(params: SamplingParams) -> worker_pb2.SamplingParams:
    pb = worker_pb2.SamplingParams()
    for row in _WORKER_SAMPLING_FIELDS:
        value = getattr(params, row.name)
        if row.is_list:
            getattr(pb, row.name).extend(value)
        elif value is not None:
            setattr(pb, row.name, value)
    return pb


def sampling_from_pb(pb: worker_pb2.SamplingParams, num_prompt_tokens: int | None = None) -> SamplingParams:
    """Raises ValueError naming the field (`sampling.<field>: ...`, the engine's validation) on bad values;
    with `num_prompt_tokens`, also when the earlier outputs would not fit in the prompt that ends with them."""
    if num_prompt_tokens is not None and not 0 <= pb.num_output_tokens_before < num_prompt_tokens:
        raise ValueError(f"sampling.num_output_tokens_before must be in [0, {num_prompt_tokens}) (the prompt "
                         f"ends with them), got {pb.num_output_tokens_before}")
    values = {}
    for row in _WORKER_SAMPLING_FIELDS:
        if row.is_list:
            values[row.name] = list(getattr(pb, row.name))
        elif not row.is_optional or pb.HasField(row.name):
            values[row.name] = getattr(pb, row.name)
    try:
        return SamplingParams(**values)
    except ValueError as exc:
        raise ValueError(f"sampling.{exc}") from exc


def logprobs_to_pb(logprobs: TokenLogprobs) -> worker_pb2.TokenLogprobs:
    return worker_pb2.TokenLogprobs(
        token_id=logprobs.token_id,
        logprob=logprobs.logprob,
        top_token_ids=logprobs.top_token_ids,
        top_logprobs=logprobs.top_logprobs,
    )


def logprobs_from_pb(pb: worker_pb2.TokenLogprobs) -> TokenLogprobs:
    return TokenLogprobs(pb.token_id, pb.logprob, list(pb.top_token_ids), list(pb.top_logprobs))


@dataclass
class WorkerStatsData:
    """A worker's load and KV usage (what GetStats returns)."""

    role: str  # "prefill" | "decode"
    is_ready: bool
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    kv_cache_usage: float = 0.0
    num_queued_prompt_tokens: int = 0
    num_requests_served: int = 0
    num_transfers: int = 0
    num_transfer_bytes: int = 0
    num_transfer_failures: int = 0
    num_held_leases: int = 0
    num_generated_tokens: int = 0
    max_model_len: int = 0
    vocab_size: int = 0
    eos_token_ids: list[int] = field(default_factory=list)
    layout: KVLayout | None = None  # the worker's KV layout
    num_kernel_compiles_after_ready: int = 0  # Triton variants compiled since SERVING; 0 on CPU
    # routing keys of the worker's cached blocks, most recently cached first (block_hash.routing_key)
    cached_block_keys: list[int] = field(default_factory=list)
    prefix_cache_queries_tokens: int = 0  # prompt tokens looked up in the prefix cache since start
    prefix_cache_hits_tokens: int = 0  # of those, tokens found cached
    is_prefix_caching_enabled: bool = False

    @property
    def num_used_blocks(self) -> int:
        return self.num_total_blocks - self.num_free_blocks


_STATS_SCALARS = (
    "role", "is_ready", "num_running", "num_waiting", "num_free_blocks", "num_total_blocks",
    "kv_cache_usage", "num_queued_prompt_tokens", "num_requests_served", "num_transfers",
    "num_transfer_bytes", "num_transfer_failures", "num_held_leases", "num_generated_tokens",
    "max_model_len", "vocab_size", "num_kernel_compiles_after_ready", "prefix_cache_queries_tokens",
    "prefix_cache_hits_tokens", "is_prefix_caching_enabled",
)


def stats_to_pb(stats: WorkerStatsData) -> worker_pb2.WorkerStats:
    pb = worker_pb2.WorkerStats(**{name: getattr(stats, name) for name in _STATS_SCALARS})
    pb.eos_token_ids.extend(stats.eos_token_ids)
    pb.cached_block_keys.extend(stats.cached_block_keys)
    if stats.layout is not None:
        pb.layout.CopyFrom(layout_to_pb(stats.layout))
    return pb


def stats_from_pb(pb: worker_pb2.WorkerStats, max_cached_block_keys: int | None = None) -> WorkerStatsData:
    """`max_cached_block_keys`: a longer cache summary is dropped (left empty), never converted."""
    stats = WorkerStatsData(**{name: getattr(pb, name) for name in _STATS_SCALARS})
    stats.eos_token_ids = list(pb.eos_token_ids)
    if max_cached_block_keys is None or len(pb.cached_block_keys) <= max_cached_block_keys:
        stats.cached_block_keys = list(pb.cached_block_keys)
    stats.layout = layout_from_pb(pb.layout) if pb.HasField("layout") else None
    return stats


def handle_to_pb(handle: KVHandle) -> worker_pb2.KVHandle:
    return worker_pb2.KVHandle(
        transfer_id=handle.transfer_id,
        sender_address=handle.address,
        num_tokens=handle.num_tokens,
        num_blocks=handle.num_blocks,
        layout=layout_to_pb(handle.layout),
        block_hashes=handle.block_hashes,
    )


def handle_from_pb(pb: worker_pb2.KVHandle) -> KVHandle:
    """Raises ValueError naming the field (`kv_handle.<field>: ...`) on a malformed handle."""
    try:
        return KVHandle(pb.transfer_id, pb.sender_address, pb.num_tokens, pb.num_blocks, layout_from_pb(pb.layout),
                        tuple(pb.block_hashes))
    except ValueError as exc:
        raise ValueError(f"kv_handle.{exc}") from exc


def transfer_stats_to_pb(stats: TransferStats | None) -> worker_pb2.TransferStats:
    if stats is None:
        return worker_pb2.TransferStats()
    return worker_pb2.TransferStats(
        num_bytes=stats.num_bytes, seconds=stats.seconds, transport=stats.transport, num_blocks=stats.num_blocks,
        num_reused_blocks=stats.num_reused_blocks,
    )
