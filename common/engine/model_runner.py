"""The only engine code that touches tensors and devices: plan in, sampled tokens out.

Prefill and mixed steps (eager) pack every sequence's new tokens into one flat batch, build
AttentionMetadata, run the model (which writes K/V into the pool), compute logits only at the last
new token of each sequence that samples, and hand those rows to the sampler:

    plan.seqs:       [ seq0 (query_len 5) | seq1 (query_len 1) | seq2 (query_len 3) ]
    input_ids:       [ t t t t t          | t                  | t t t              ]   [T]
    logits rows:                 ^ 4                ^ 5                    ^ 8          [N, V]

Every row goes through the linear layers together; in a mixed step, attention takes the leading
`plan.num_decodes` one-token rows through the decode path and the prompt chunks through the prefill
path (`AttentionMetadata.build(num_decode_seqs=...)`). Mixed steps run eagerly: graphing them would
take piecewise graphs around everything but attention (vLLM's), as their token counts vary per step.

Decode steps (one token per sequence) take the fast path: inputs staged by `DecodeInputBuffers`
(one host buffer, one copy, block tables kept on the device), then a CUDA graph replay padded to a
captured batch size (`cuda_graphs`), or the same forward run eagerly (CPU, enforce_eager, batches
larger than any graph). When every row is greedy without logprobs or penalties, sampling is one
argmax on the device and one `.tolist()`, the step's only synchronisation.

`launch` queues a step without waiting for its tokens (asynchronous scheduling): decode rows whose
input token is still in flight read it from the previous step's samples on the device.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import torch

from common.attention import AttentionMetadata
from common.attention.metadata import upload_index_lists
from common.engine import kv_budget
from common.engine.config import DEFAULT_CPU_KV_CACHE_BYTES, EngineConfig
from common.engine.cuda_graphs import CUDAGraphRunner, DecodeForward, capture_batch_sizes, decode_split_plan
from common.engine.decode_inputs import DecodeInputBuffers
from common.engine.kv_budget import MemoryProfile
from common.engine.sampler import Sampler, SamplingRow
from common.engine.scheduler import SampledToken, SchedulerPlan
from common.engine.sequence import PLACEHOLDER_TOKEN_ID, Sequence, needs_host_tokens
from common.kv.block_count import num_blocks_for
from common.kv.kv_pool import KVPool
from common.kv.layout import KVLayout

logger = logging.getLogger(__name__)


@dataclass
class InFlightStep:
    """A step launched without waiting for its tokens (asynchronous scheduling)."""

    plan: SchedulerPlan
    token_ids: torch.Tensor  # [num_sampled] int64 on the device, one per plan.sampled_seqs: the next step's inputs
    host_token_ids: torch.Tensor  # [num_sampled] int64 on the host, valid once `done` has completed
    done: torch.cuda.Event | None  # recorded after the copy to the host; None on CPU (already done)
    step_id: int  # 1, 2, ... in launch order (the engine fences freed blocks by it)


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_pool: KVPool,
        device: torch.device,
        seed: int,
        *,
        max_num_seqs: int = 256,
        max_model_len: int | None = None,  # default: the model's max_position_embeddings
        scratch_block_id: int | None = None,  # default: the pool's last block (the engine never allocates it)
        use_cuda_graphs: bool = False,
        cuda_graph_max_batch_size: int = 256,
        capture_graphs: bool = True,  # False: graph decisions without capture (CPU tests of the same path)
    ):
        self.model = model
        self.kv_pool = kv_pool
        self.device = device
        self.block_size = kv_pool.layout.block_size
        self.sampler = Sampler(torch.Generator(device=device).manual_seed(seed))
        max_model_len = max_model_len or model.config.max_position_embeddings
        scratch_block_id = kv_pool.num_blocks - 1 if scratch_block_id is None else scratch_block_id
        self.decode_buffers = DecodeInputBuffers(
            max_num_seqs, num_blocks_for(max_model_len, self.block_size), self.block_size, scratch_block_id, device
        )
        self.decode_forward = DecodeForward(model, kv_pool.kv, self.decode_buffers, model.config.vocab_size)
        # Launched steps copy their tokens here, in turn: at most two steps are in flight.
        self._token_staging = [torch.empty(max_num_seqs, dtype=torch.int64, pin_memory=True) for _ in range(2)] \
            if device.type == "cuda" else []
        self._num_launched = 0  # steps launched so far
        self.graph_runner: CUDAGraphRunner | None = None
        if use_cuda_graphs:
            if capture_graphs and device.type != "cuda":
                raise ValueError(f"CUDA graphs need a CUDA device, the model runs on {device}")
            self.graph_runner = self._build_graph_runner(max_num_seqs, max_model_len, cuda_graph_max_batch_size,
                                                         capture_graphs)

    def _build_graph_runner(self, max_num_seqs, max_model_len, max_capture_size, capture) -> CUDAGraphRunner:
        from kernels.launch_utils import num_multiprocessors

        num_sms = num_multiprocessors(self.device)
        num_kv_heads = self.kv_pool.layout.num_kv_heads

        def plan_of(num_rows: int, plan_context_len: int):
            return decode_split_plan(num_rows, num_kv_heads, plan_context_len, num_sms)

        sizes = capture_batch_sizes(max_num_seqs, max_capture_size)
        return CUDAGraphRunner(self.decode_forward, sizes, max_model_len, plan_of, capture=capture)

    @torch.inference_mode()
    def run(self, plan: SchedulerPlan) -> list[SampledToken | None]:
        """One forward pass for the plan; one entry per `plan.seqs`, None where nothing is sampled."""
        # Triton launches and graph replays go to the current device: make it the model's (cuda:N).
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            if not plan.is_prefill:
                return self._run_decode(plan.seqs)
            return self._run_prefill(plan)

    def _run_prefill(self, plan: SchedulerPlan) -> list[SampledToken | None]:
        logits = self._packed_logits(plan)  # [N, V] float32, one row per sampled sequence
        if logits is None:
            return [None] * len(plan.seqs)
        samples = iter(self._sample(logits, plan.sampled_seqs))
        return [next(samples) if is_sampled else None for is_sampled in plan.is_sampled]

    def _packed_logits(self, plan: SchedulerPlan, previous: InFlightStep | None = None) -> torch.Tensor | None:
        """The packed forward of a prefill or mixed step -> logits [N, V] fp32 of its N sampled rows
        (None when nothing samples)."""
        input_ids, positions, metadata, last_token_rows = self._prepare_inputs(plan, previous)
        hidden = self.model(input_ids, positions, self.kv_pool.kv, metadata)  # [T, hidden]
        if last_token_rows is None:
            return None
        if last_token_rows.shape[0] < hidden.shape[0]:
            hidden = hidden[last_token_rows]  # [N, hidden]
        return self.model.compute_logits(hidden)  # [N, V] float32

    def _run_decode(self, seqs: list[Sequence]) -> list[SampledToken]:
        return self._sample(self._decode_logits(seqs), seqs)

    def _decode_logits(self, seqs: list[Sequence], previous: InFlightStep | None = None) -> torch.Tensor:
        """One token per sequence: a graph replay at the padded batch size, else the same forward eagerly.
        Input tokens still in flight come from `previous`'s samples on the device. -> [N, V] fp32"""
        num_seqs = len(seqs)
        num_rows = self.graph_runner.padded_size(num_seqs) if self.graph_runner is not None else None
        previous_rows = previous_tokens = None
        if previous is not None:
            previous_rows = _sampled_rows(previous)
            previous_tokens = previous.token_ids
        batch = self.decode_buffers.prepare(seqs, num_rows or num_seqs, previous_rows, previous_tokens)
        if num_rows is not None:
            return self.graph_runner.replay(batch)[:num_seqs]
        return self.decode_forward(num_seqs, batch.max_context_len)

    @staticmethod
    def can_launch(plan: SchedulerPlan) -> bool:
        """Whether a step can run without waiting for its tokens on the host: no row needs them there
        (logprobs, penalties, a prefill-only hand-off)."""
        return not any(needs_host_tokens(seq) for seq in plan.seqs)

    @torch.inference_mode()
    def launch(self, plan: SchedulerPlan, previous: InFlightStep | None) -> InFlightStep:
        """Queues a step (forward, sampling, copy of the tokens to the host) and returns without waiting
        for it; `finish` waits. `previous`: the step still in flight, if any."""
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            seqs = plan.sampled_seqs
            if plan.is_prefill:
                logits = self._packed_logits(plan, previous)  # [N, V] fp32, or None: nothing sampled
            else:
                logits = self._decode_logits(plan.seqs, previous)  # [N, V] fp32
            if logits is None:
                token_ids = torch.empty(0, dtype=torch.int64, device=self.device)
            elif all(seq.sampling_params.is_plain_greedy for seq in seqs):
                token_ids = logits.argmax(dim=-1)  # [N] int64
            else:
                token_ids = self.sampler.choose(logits, [_sampling_row(seq) for seq in seqs])
            self._num_launched += 1
            if self.device.type != "cuda":
                return InFlightStep(plan, token_ids, token_ids, None, self._num_launched)
            host = self._token_staging[self._num_launched % len(self._token_staging)][: len(seqs)]
            host.copy_(token_ids, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            return InFlightStep(plan, token_ids, host, done, self._num_launched)

    @staticmethod
    def finish(step: InFlightStep) -> list[int]:
        """Waits for a launched step; its token ids, one per `step.plan.sampled_seqs`."""
        if step.done is not None:
            step.done.synchronize()
        return step.host_token_ids.tolist()

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[SampledToken]:
        """logits [N, V] fp32, one row per sequence."""
        if all(seq.sampling_params.is_plain_greedy for seq in seqs):
            return [SampledToken(token_id, None) for token_id in logits.argmax(dim=-1).tolist()]
        token_ids, logprobs = self.sampler(logits, [_sampling_row(seq) for seq in seqs])
        return [SampledToken(token_id, lp) for token_id, lp in zip(token_ids, logprobs)]

    def _prepare_inputs(self, plan: SchedulerPlan, previous: InFlightStep | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None]:
        """input_ids [T], positions [T], metadata and the packed rows of the sampled sequences' last tokens
        ([N], None when nothing samples) of a packed step. A decode row whose token is still in flight
        reads it from `previous`'s samples, on the device."""
        input_ids: list[int] = []
        positions: list[int] = []
        context_lens: list[int] = []
        last_token_rows: list[int] = []
        in_flight_rows: list[int] = []  # packed rows whose token is in flight ...
        source_rows: list[int] = []  # ... and its row in previous.token_ids
        previous_rows = None
        for seq, query_len, is_sampled in zip(plan.seqs, plan.query_lens, plan.is_sampled):
            start = seq.num_computed_tokens
            end = start + query_len
            if query_len == 1:
                token_id = seq.token_ids[start]
                if token_id == PLACEHOLDER_TOKEN_ID:
                    previous_rows = previous_rows or _sampled_rows(previous)
                    if seq not in previous_rows:
                        raise ValueError(f"the input token of {seq.request_id!r} is in flight, but not in the "
                                         f"previous step")
                    in_flight_rows.append(len(input_ids))
                    source_rows.append(previous_rows[seq])
                    token_id = 0
                input_ids.append(token_id)
                positions.append(start)
            else:
                input_ids += seq.token_ids[start:end]
                positions += range(start, end)
            if is_sampled:
                last_token_rows.append(len(input_ids) - 1)
            context_lens.append(end)
        metadata = AttentionMetadata.build(
            plan.query_lens, context_lens, [seq.block_table for seq in plan.seqs], self.block_size, self.device,
            num_decode_seqs=plan.num_decodes if plan.is_mixed else 0,
        )
        int64 = torch.int64
        input_ids_tensor, positions_tensor, rows_tensor, in_flight_tensor, source_tensor = upload_index_lists(
            [(input_ids, int64), (positions, int64), (last_token_rows, int64), (in_flight_rows, int64),
             (source_rows, int64)], self.device)
        if in_flight_rows:
            input_ids_tensor.index_copy_(0, in_flight_tensor, previous.token_ids[source_tensor])
        return input_ids_tensor, positions_tensor, metadata, rows_tensor if last_token_rows else None


def _sampled_rows(previous: InFlightStep | None) -> dict[Sequence, int]:
    """{sequence: its row in previous.token_ids} (previous: the step whose tokens are in flight)."""
    if previous is None:
        raise ValueError("an input token is in flight, but no step is")
    return {sampled: row for row, sampled in enumerate(previous.plan.sampled_seqs)}


_NON_TORCH_FALLBACK_BYTES = 1 << 30  # counted for the CUDA context & co. when NVML cannot see this process


@torch.inference_mode()
def profile_peak_memory(
    model: torch.nn.Module,
    layout: KVLayout,
    device: torch.device,
    num_tokens: int,
    max_model_len: int,
    num_logit_rows: int,
    graph_batch_size: int | None = None,
) -> MemoryProfile:
    """CUDA only: this process's own memory figures, from forwards on throwaway pools.

    peak_torch_bytes: torch's peak over a forward of `num_tokens` (prompts of up to max_model_len),
    logits and the sampler's temporaries for `num_logit_rows` rows: weights + the largest step.
    cuda_graph_bytes: the peak of one decode step of `graph_batch_size` rows, which the decode graphs'
    private pool keeps reserved (None: decode runs eagerly, nothing is kept).
    non_torch_bytes: what this process holds outside torch (CUDA context, cuBLAS, loaded kernels).
    Other processes enter only `free_bytes`.
    """
    lengths = [max_model_len] * (num_tokens // max_model_len)
    if num_tokens % max_model_len:
        lengths.append(num_tokens % max_model_len)
    cuda_graph_bytes = 0
    with torch.cuda.device(device):  # Triton launches go to the current device
        peak_torch_bytes = _forward_peak_bytes(model, layout, device, lengths, num_logit_rows, is_sampled=True)
        if graph_batch_size is not None:
            weights_bytes = torch.cuda.memory_reserved(device)
            # one token per sequence: the decode kernels; logits [B, V] as the graphs' shared output
            decode_peak = _forward_peak_bytes(model, layout, device, [1] * graph_batch_size, graph_batch_size,
                                              is_sampled=False)
            cuda_graph_bytes = max(decode_peak - weights_bytes, 0)
    reserved = torch.cuda.memory_reserved(device)
    free, total = torch.cuda.mem_get_info(device)
    return MemoryProfile(
        total_bytes=total, free_bytes=free, torch_reserved_bytes=reserved, peak_torch_bytes=peak_torch_bytes,
        cuda_graph_bytes=cuda_graph_bytes, non_torch_bytes=_non_torch_bytes(device, reserved, total - free),
    )


def _forward_peak_bytes(model, layout: KVLayout, device: torch.device, lengths: list[int], num_rows: int,
                        is_sampled: bool) -> int:
    """Torch's peak reserved bytes over one forward of prompts of `lengths` plus logits (and, if
    sampled, the sampler's temporaries) for `num_rows` rows, less the throwaway pool it writes K/V into."""
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    tables, num_blocks = [], 0
    for length in lengths:
        count = num_blocks_for(length, layout.block_size)
        tables.append(list(range(num_blocks, num_blocks + count)))
        num_blocks += count
    pool = torch.zeros(layout.block_shape(num_blocks), dtype=layout.torch_dtype, device=device)
    pool_bytes = pool.numel() * pool.element_size()
    metadata = AttentionMetadata.build(lengths, lengths, tables, layout.block_size, device)
    input_ids = torch.zeros(sum(lengths), dtype=torch.int64, device=device)
    positions = torch.cat([torch.arange(length, device=device) for length in lengths])
    hidden = model(input_ids, positions, pool, metadata)  # [T, hidden]
    logits = model.compute_logits(hidden[:1].expand(num_rows, -1).contiguous())  # [rows, V]
    if is_sampled:
        torch.softmax(logits, dim=-1).sort(dim=-1)  # the sampler's biggest temporaries
    torch.cuda.synchronize(device)
    del pool, hidden, logits
    peak = torch.cuda.max_memory_reserved(device) - pool_bytes
    torch.cuda.empty_cache()
    return peak


def _non_torch_bytes(device: torch.device, reserved: int, device_used: int) -> int:
    """This process's device memory outside torch's allocator: NVML's per-process figure less torch's
    reservations. Where NVML cannot see this process (no pynvml, a PID namespace, MIG), the device's
    whole non-torch use, capped at _NON_TORCH_FALLBACK_BYTES so other processes count no further."""
    own = _nvml_process_bytes(device)
    if own is not None:
        return max(own - reserved, 0)
    fallback = min(max(device_used - reserved, 0), _NON_TORCH_FALLBACK_BYTES)
    logger.warning("NVML does not report this process's memory on %s: counting %.2f GiB for its CUDA context",
                   device, fallback / 2**30)
    return fallback


def _nvml_process_bytes(device: torch.device) -> int | None:
    """Bytes NVML says this process holds on `device` (context included), or None if it cannot say."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{torch.cuda.get_device_properties(device).uuid}")
            processes = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no pynvml, no driver access, MIG: the caller falls back
        return None
    used = [p.usedGpuMemory for p in processes if p.pid == os.getpid() and p.usedGpuMemory is not None]
    return int(used[0]) if used else None


def decode_uses_cuda_graphs(config: EngineConfig, model: torch.nn.Module, device: torch.device) -> bool:
    """Decode steps replay CUDA graphs on CUDA with the Triton backend, unless enforce_eager.

    The reference backend gathers every context padded to the graph's plan length, which at
    max_model_len would not fit in memory: it stays eager. A KV producer (prefill worker) never
    runs a decode step, so it captures nothing.
    """
    if device.type != "cuda" or config.enforce_eager or config.kv_role == "kv_producer":
        return False
    return model.attention_backend.name == "triton"


def determine_num_kv_blocks(
    config: EngineConfig, model: torch.nn.Module, layout: KVLayout, device: torch.device, max_model_len: int
) -> int:
    """Pool size in blocks: explicit `num_kv_blocks`, else what `kv_cache_memory_bytes` (CPU default
    1 GiB) holds, else on CUDA this process's `gpu_memory_utilization` share less its weights, peak
    activations, decode graphs and CUDA context (`kv_budget`); at most `max_num_kv_tokens` (a
    kv_producer's default: what a prefill worker holds)."""
    bytes_per_block = layout.bytes_per_block
    if config.num_kv_blocks is not None:
        return kv_budget.num_kv_blocks(config.num_kv_blocks * bytes_per_block, bytes_per_block,
                                       layout.block_size, max_model_len)
    if config.kv_cache_memory_bytes is not None or device.type != "cuda":
        kv_bytes = config.kv_cache_memory_bytes or DEFAULT_CPU_KV_CACHE_BYTES
    else:
        uses_graphs = decode_uses_cuda_graphs(config, model, device)
        profile = profile_peak_memory(
            model, layout, device, config.max_num_batched_tokens, max_model_len, config.max_num_seqs,
            min(config.max_num_seqs, config.cuda_graph_max_batch_size) if uses_graphs else None,
        )
        kv_bytes = kv_budget.kv_bytes_for_utilization(profile, config.gpu_memory_utilization, str(device))
    max_num_kv_tokens = config.max_num_kv_tokens
    if max_num_kv_tokens is None and config.kv_role == "kv_producer":
        max_num_kv_tokens = kv_budget.producer_max_num_kv_tokens(
            config.max_num_batched_tokens, config.max_num_seqs, max_model_len, layout.block_size)
    return kv_budget.num_kv_blocks(kv_bytes, bytes_per_block, layout.block_size, max_model_len, max_num_kv_tokens)


def _sampling_row(seq: Sequence) -> SamplingRow:
    params = seq.sampling_params
    if params.has_penalties:  # token lists are only copied when a penalty needs them
        return SamplingRow(params, seq.num_output_tokens, seq.prompt_token_ids, seq.output_token_ids)
    return SamplingRow(params, seq.num_output_tokens, [], [])
