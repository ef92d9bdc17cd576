"""The only engine code that touches tensors and devices: plan in, sampled tokens out.

For a plan it packs every sequence's new tokens into one flat batch, builds AttentionMetadata, runs
the model (which writes K/V into the pool), computes logits only at the last new token of each
sequence that samples, and hands those rows to the sampler.

    plan.seqs:       [ seq0 (query_len 5) | seq1 (query_len 1) | seq2 (query_len 3) ]
    input_ids:       [ t t t t t          | t                  | t t t              ]   [T]
    logits rows:                 ^ 4                ^ 5                    ^ 8          [N, V]
"""

from __future__ import annotations

import torch

from common.attention import AttentionMetadata
from common.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from common.engine.sampler import Sampler, SamplingRow
from common.engine.scheduler import SampledToken, SchedulerPlan
from common.engine.sequence import Sequence
from common.kv.kv_pool import KVLayout, KVPool, num_blocks_for_budget


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_pool: KVPool, device: torch.device, seed: int):
        self.model = model
        self.kv_pool = kv_pool
        self.device = device
        self.block_size = kv_pool.layout.block_size
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))

    @torch.inference_mode()
    def run(self, plan: SchedulerPlan) -> list[SampledToken | None]:
        """One forward pass for the plan; one entry per `plan.seqs`, None where nothing is sampled."""
        input_ids, positions, metadata = self._prepare_inputs(plan)
        hidden = self.model(input_ids, positions, self.kv_pool.kv, metadata)  # [T, hidden]
        sampled_index = [i for i, is_sampled in enumerate(plan.is_sampled) if is_sampled]
        if not sampled_index:
            return [None] * len(plan.seqs)
        last_token_rows = [metadata.query_start_locs_cpu[i + 1] - 1 for i in sampled_index]
        if len(last_token_rows) < hidden.shape[0]:
            hidden = hidden[torch.tensor(last_token_rows, device=self.device)]  # [N, hidden]
        logits = self.model.compute_logits(hidden)  # [N, V] float32
        rows = [_sampling_row(plan.seqs[i]) for i in sampled_index]
        token_ids, logprobs = self.sampler(logits, rows)
        results: list[SampledToken | None] = [None] * len(plan.seqs)
        for i, token_id, token_logprobs in zip(sampled_index, token_ids, logprobs):
            results[i] = SampledToken(token_id, token_logprobs)
        return results

    def _prepare_inputs(self, plan: SchedulerPlan) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        input_ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        for seq, query_len in zip(plan.seqs, plan.query_lens):
            start = seq.num_computed_tokens
            end = start + query_len
            if query_len == 1:
                input_ids.append(seq.token_ids[start])
                positions.append(start)
            else:
                input_ids += seq.token_ids[start:end]
                positions += range(start, end)
            context_lens.append(end)
        metadata = AttentionMetadata.build(
            plan.query_lens, context_lens, [seq.block_table for seq in plan.seqs], self.block_size, self.device
        )
        return (
            torch.tensor(input_ids, dtype=torch.int64, device=self.device),
            torch.tensor(positions, dtype=torch.int64, device=self.device),
            metadata,
        )

@torch.inference_mode()
def profile_peak_memory(
    model: torch.nn.Module,
    layout: KVLayout,
    device: torch.device,
    num_tokens: int,
    max_model_len: int,
    num_logit_rows: int,
) -> int:
    """CUDA only: peak bytes allocated by a forward of `num_tokens` plus logits for the rows.

    Runs on a throwaway pool just big enough for those tokens, so the measured peak covers the
    weights, the largest prefill's activations, and the sampler's [rows, vocab] buffers.
    """
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    lengths = [max_model_len] * (num_tokens // max_model_len)
    if num_tokens % max_model_len:
        lengths.append(num_tokens % max_model_len)
    tables, num_blocks = [], 0
    for length in lengths:
        count = -(-length // layout.block_size)
        tables.append(list(range(num_blocks, num_blocks + count)))
        num_blocks += count
    pool = torch.zeros(layout.block_shape(num_blocks), dtype=layout.dtype, device=device)
    metadata = AttentionMetadata.build(lengths, lengths, tables, layout.block_size, device)
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(length, device=device) for length in lengths])
    hidden = model(input_ids, positions, pool, metadata)  # [T, hidden]
    logits = model.compute_logits(hidden[:1].expand(num_logit_rows, -1).contiguous())  # [rows, V]
    torch.softmax(logits, dim=-1).sort(dim=-1)  # the sampler's biggest temporaries
    torch.cuda.synchronize(device)
    del pool, hidden, logits
    peak = torch.cuda.max_memory_allocated(device)
    torch.cuda.empty_cache()
    return peak


def determine_num_kv_blocks(
    config: EngineConfig, model: torch.nn.Module, layout: KVLayout, device: torch.device, max_model_len: int
) -> int:
    """Pool size in blocks: explicit `num_kv_blocks`, else `kv_cache_memory_bytes` (CPU default
    1 GiB), else on CUDA what `gpu_memory_utilization` leaves after weights and peak activations."""
    if config.num_kv_blocks is not None:
        num_blocks = config.num_kv_blocks
    elif config.kv_cache_memory_bytes is not None or device.type != "cuda":
        num_blocks = num_blocks_for_budget(layout, config.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES)
    else:
        peak = profile_peak_memory(model, layout, device, config.max_num_batched_tokens, max_model_len,
                                   config.max_num_seqs)
        free, total = torch.cuda.mem_get_info(device)
        not_torch = total - free - torch.cuda.memory_reserved(device)  # CUDA context, other processes
        budget = int(total * config.gpu_memory_utilization) - peak - not_torch
        if budget <= 0:
            raise ValueError(
                f"gpu_memory_utilization {config.gpu_memory_utilization} leaves no room for the KV cache: "
                f"weights and activations peak at {peak / 2**30:.2f} GiB of {total / 2**30:.2f} GiB"
            )
        num_blocks = num_blocks_for_budget(layout, budget)
    if num_blocks * layout.block_size < max_model_len:
        raise ValueError(
            f"the KV pool holds {num_blocks} blocks x {layout.block_size} tokens, fewer than max_model_len "
            f"{max_model_len}: raise num_kv_blocks / kv_cache_memory_bytes / gpu_memory_utilization, "
            f"or lower max_model_len"
        )
    return num_blocks


def _sampling_row(seq: Sequence) -> SamplingRow:
    params = seq.sampling_params
    if params.has_penalties:  # token lists are only copied when a penalty needs them
        return SamplingRow(params, seq.num_output_tokens, seq.prompt_token_ids, seq.output_token_ids)
    return SamplingRow(params, seq.num_output_tokens, [], [])
