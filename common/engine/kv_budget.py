"""How many KV blocks a worker's pool gets: arithmetic over memory figures, no torch, no device.

On CUDA, `gpu_memory_utilization` is the share of the GPU's total memory that THIS process may use,
whatever other processes hold (vLLM's meaning), so two workers sharing a GPU each get the pool their
own share buys, in either start order:

    requested = utilization x total
    |<------------------------------------ requested ------------------------------------>|
    | torch peak: weights + activations | decode graphs | non-torch: CUDA context, ... | KV |

    kv_bytes = requested - peak_torch - cuda_graphs - non_torch

Other processes matter to one check only: what this process does not hold yet must be free now.
The pool is then capped at `max_num_kv_tokens` (rounded up to whole blocks): an explicit cap, or
the producer default below, which sizes a prefill worker for what it actually holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.kv.block_count import num_blocks_for

KV_ROLES = ("kv_both", "kv_producer", "kv_consumer")  # vLLM's KVTransferConfig.kv_role names
PRODUCER_HELD_STEPS = 4  # prefill steps' worth of hand-offs a producer holds while they wait to be pulled
_GIB = 2**30


@dataclass(frozen=True)
class MemoryProfile:
    """One process's figures for its GPU, in bytes, as the model runner measured them."""

    total_bytes: int  # the device's memory
    free_bytes: int  # free on the device now (what no process holds)
    torch_reserved_bytes: int  # held by this process's torch allocator now (weights, once the profile is freed)
    peak_torch_bytes: int  # torch's peak during the profile: weights + the largest step's activations
    cuda_graph_bytes: int  # the decode graphs' private memory pool; 0 when decode runs eagerly
    non_torch_bytes: int  # this process's memory outside torch: CUDA context, cuBLAS, kernel modules

    @property
    def used_bytes(self) -> int:
        """What this process holds on the device now."""
        return self.torch_reserved_bytes + self.non_torch_bytes


def kv_bytes_for_utilization(profile: MemoryProfile, utilization: float, device: str) -> int:
    """The KV pool's share of `utilization x total`; ValueError when the GPU cannot give that share
    now or the share leaves nothing for the KV cache."""
    if not 0 < utilization <= 1:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {utilization!r}")
    requested = int(profile.total_bytes * utilization)
    available = profile.free_bytes + profile.used_bytes  # free, plus what this process already holds
    if available < requested:
        raise ValueError(
            f"{device} has {available / _GIB:.1f} GiB free; --gpu-memory-utilization {utilization} asks for "
            f"{requested / _GIB:.1f} GiB (other processes hold {(profile.total_bytes - available) / _GIB:.1f} GiB)"
        )
    kv_bytes = requested - profile.peak_torch_bytes - profile.cuda_graph_bytes - profile.non_torch_bytes
    if kv_bytes <= 0:
        raise ValueError(
            f"--gpu-memory-utilization {utilization} ({requested / _GIB:.2f} GiB of {device}) leaves no room "
            f"for the KV cache: weights and activations peak at {profile.peak_torch_bytes / _GIB:.2f} GiB, "
            f"decode graphs take {profile.cuda_graph_bytes / _GIB:.2f} GiB, the CUDA context and the rest "
            f"{profile.non_torch_bytes / _GIB:.2f} GiB"
        )
    return kv_bytes


def producer_max_num_kv_tokens(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int,
                               block_size: int) -> int:
    """What a prefill worker holds at most: PRODUCER_HELD_STEPS steps of hand-offs awaiting their pull
    (each step's prompts fill at most ceil(batched / block) blocks plus one partial block per prompt),
    plus one prompt of max_model_len being prefilled across steps."""
    blocks_per_step = num_blocks_for(max_num_batched_tokens, block_size) + max_num_seqs
    return (PRODUCER_HELD_STEPS * blocks_per_step + num_blocks_for(max_model_len, block_size)) * block_size


def num_kv_blocks(kv_bytes: int, bytes_per_block: int, block_size: int, max_model_len: int,
                  max_num_kv_tokens: int | None = None) -> int:
    """Blocks that fit in `kv_bytes`, at most enough for `max_num_kv_tokens`; ValueError when the
    pool could not hold one sequence of `max_model_len` tokens."""
    if kv_bytes < 0 or bytes_per_block <= 0:
        raise ValueError(f"KV bytes must be >= 0 and bytes per block > 0, got {kv_bytes}, {bytes_per_block}")
    num_blocks = kv_bytes // bytes_per_block
    if max_num_kv_tokens is not None:
        num_blocks = min(num_blocks, num_blocks_for(max_num_kv_tokens, block_size))
    if num_blocks * block_size < max_model_len:
        raise ValueError(
            f"the KV pool holds {num_blocks} blocks x {block_size} tokens, fewer than max_model_len "
            f"{max_model_len}: raise num_kv_blocks / kv_cache_memory_bytes / gpu_memory_utilization / "
            f"max_num_kv_tokens, or lower max_model_len"
        )
    return num_blocks
