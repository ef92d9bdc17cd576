"""The engine loop: requests in, one batched forward per `step()`, `RequestOutput`s out.

Single-threaded and synchronous (services run it on a thread of their own). Where a request lives:

    add_request / add_prefill_request ──► scheduler (waiting → running) ──► finished
    reserve_kv ──► reserved blocks ──► add_decode_request ──► scheduler (running) ──► finished
                   (cached prefix reused, the rest pulled by the caller)
    prefill-only requests finish after token #1 with their blocks held ──► release_kv

`abort_request` frees a request wherever it is; its final output (finish_reason "abort") comes
from the next `step()`.

Asynchronous scheduling (`async_scheduling`, the default): a step that needs nothing from the host's
token lists (a decode step, or with chunked prefill any step) is launched and `step()` returns without
waiting for it; the next `step()` plans and launches the step after it, then waits for the first and
returns its outputs. The host's work (outputs, stop checks, planning, inputs) runs while the device
computes:

    step() k:    launch N+1 (inputs: N's tokens, on the device) ─► wait for N ─► outputs of N
    device:      ... N ][ N+1 ][ N+2 ...    (no gap while the host keeps up)

Tokens therefore come out one `step()` later, and a request that stops at step N (EOS, a stop token)
still has its row computed in step N+1, dropped. Logprobs, penalties, prefill-only requests and,
without chunked prefill, prefill steps wait for their tokens; blocks freed while a step is in flight
are fenced until it completes.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from common.attention import get_attention_backend
from common.engine.config import EngineConfig
from common.engine.kv_reservation import KVReservation
from common.engine.model_runner import InFlightStep, ModelRunner, decode_uses_cuda_graphs, determine_num_kv_blocks
from common.engine.outputs import EngineStats, RequestOutput
from common.engine.sampling_params import SamplingParams
from common.engine.scheduler import SampledToken, Scheduler, SchedulerConfig
from common.engine.sequence import Sequence, SequenceStatus, check_finish
from common.kv.block_allocator import BlockAllocator
from common.kv.block_hash import extend_block_hashes, full_block_hashes
from common.kv.kv_pool import KVPool
from common.kv.layout import KVLayout
from common.kv.prefix_cache import PrefixCache

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(self, config: EngineConfig, model: torch.nn.Module | None = None, model_config=None):
        """Loads `config.model`, or uses an already loaded (model, model_config) pair."""
        self.config = config
        self.device = config.resolved_device()
        # Everything the engine sets up (pinned host buffers, streams, graphs) belongs to its own GPU: a
        # pinned allocation made while another GPU is current would open a CUDA context there too.
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            self._set_up(model, model_config)

    def _set_up(self, model: torch.nn.Module | None, model_config) -> None:
        config = self.config
        self.model_name = config.model or "embedded"
        self.model_folder = None  # HF folder the weights (and tokenizer) came from; None for dummy/injected
        if model is None:
            model, model_config = self._load_model()
        elif model_config is None:
            raise ValueError("model_config is required when a loaded model is passed")
        self.model, self.model_config = model, model_config
        self.max_model_len = _max_model_len(config, model_config)
        layout = KVLayout(
            model_name=self.model_name,
            num_layers=model_config.num_hidden_layers,
            block_size=config.block_size,
            num_kv_heads=model_config.num_key_value_heads,
            head_dim=model_config.head_dim,
            dtype=next(model.parameters()).dtype,
        )
        num_blocks = determine_num_kv_blocks(config, model, layout, self.device, self.max_model_len)
        # One extra block past the allocator's: the scratch block padded decode rows write to.
        self.kv_pool = KVPool(layout, num_blocks + 1, self.device)
        self.allocator = BlockAllocator(num_blocks)
        self.prefix_cache = PrefixCache(self.allocator) if config.enable_prefix_caching else None
        scheduler_config = SchedulerConfig(
            config.max_num_seqs, config.max_num_batched_tokens, config.block_size, self.max_model_len,
            config.enable_chunked_prefill,
        )
        self.scheduler = Scheduler(scheduler_config, self.allocator, frozenset(model_config.eos_token_ids),
                                   self.prefix_cache)
        self.model_runner = ModelRunner(
            model, self.kv_pool, self.device, config.seed,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            scratch_block_id=num_blocks,
            use_cuda_graphs=decode_uses_cuda_graphs(config, model, self.device),
            cuda_graph_max_batch_size=config.cuda_graph_max_batch_size,
        )
        self._requests: dict[str, Sequence] = {}  # waiting or running
        self._held: dict[str, Sequence] = {}  # prefill-only, finished, blocks held until release_kv
        self._reserved: dict[str, KVReservation] = {}  # decode side: blocks reserved for a KV hand-off
        self._pending_outputs: list[RequestOutput] = []  # abort outputs, returned by the next step
        self._in_flight: InFlightStep | None = None  # a launched step whose tokens are not read yet
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._finished_reasons: dict[str, int] = {}
        logger.info("KV pool: %d blocks of %d tokens (%.2f GiB) on %s", num_blocks, config.block_size,
                    self.kv_pool.num_bytes / 2**30, self.device)

    def _load_model(self):
        from common.model.registry import resolve_model
        from common.model.weights import load_model

        resolved = resolve_model(self.config.model, self.config.load_format)
        self.model_name, self.model_folder = resolved.name, resolved.folder
        backend = get_attention_backend(self.config.attention_backend, self.device)
        return load_model(resolved.folder, resolved.load_format, self.config.dtype, self.device, backend,
                          model_config=resolved.model_config, seed=self.config.seed)

    # ---- offline and shared ------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams) -> None:
        """Queues a full generation; tokens come out of `step()`."""
        self.scheduler.add(self._new_sequence(request_id, prompt_token_ids, sampling_params))

    def step(self) -> list[RequestOutput]:
        """One batched forward pass (if anything can run); outputs for every sequence that sampled.

        With asynchronous scheduling a decode step's outputs come from the next call (module docstring).
        """
        outputs, self._pending_outputs = self._pending_outputs, []
        if self._in_flight is not None:
            return self._step_ahead(outputs)
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return outputs
        if self._can_launch(plan):
            self._launch(plan, previous=None)
            return outputs
        samples = self.model_runner.run(plan)
        finished = self.scheduler.postprocess(plan, samples)
        for seq, sample in zip(plan.seqs, samples):
            if sample is not None:
                outputs.append(self._sampled_output(seq, sample))
        for seq in finished:
            del self._requests[seq.request_id]
            if seq.is_prefill_only:
                self._held[seq.request_id] = seq
            if seq.finish_reason is not None:
                self._count_finish(seq.finish_reason)
        return outputs

    def _can_launch(self, plan) -> bool:
        """Whether `plan` runs without waiting for its tokens (prefill steps only with chunked prefill)."""
        config = self.config
        return (config.async_scheduling and (config.enable_chunked_prefill or not plan.is_prefill)
                and self.model_runner.can_launch(plan))

    def _step_ahead(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Launches the next step if it can go without the tokens in flight, then completes the step in
        flight: its outputs join `outputs`."""
        in_flight = self._in_flight
        plan = self.scheduler.schedule_ahead()
        if plan is not None:
            self._launch(plan, previous=in_flight)
        else:
            self._in_flight = None  # the next step() plans again, with every token on the host
        token_ids = self.model_runner.finish(in_flight)
        self.allocator.release_fence(in_flight.step_id)
        if self._in_flight is None:
            self.allocator.set_fence(None)
        for seq, index, token_id in self.scheduler.complete(in_flight.plan, token_ids):
            outputs.append(self._sampled_output(seq, SampledToken(token_id, None),
                                                num_output_tokens=seq.num_output_tokens_at(index + 1)))
            if seq.is_finished:
                del self._requests[seq.request_id]
                self._count_finish(seq.finish_reason)
        return outputs

    def _launch(self, plan, previous: InFlightStep | None) -> None:
        step = self.model_runner.launch(plan, previous)
        self.allocator.set_fence(step.step_id)  # blocks freed from now on wait for this step
        self.scheduler.launched(plan)
        self._in_flight = step

    def abort_request(self, request_id: str) -> None:
        """Stops a request wherever it is and frees its blocks; unknown or finished ids are ignored."""
        if request_id in self._requests:
            seq = self._requests.pop(request_id)
            self.scheduler.abort(seq)
            self._count_finish("abort")
            self._pending_outputs.append(self._final_output(seq, "abort"))
        elif request_id in self._held:
            self.release_kv(request_id)
        elif request_id in self._reserved:
            # the tail first: reused (cached) blocks go back to the cached-free LRU, still findable
            self.allocator.free(self._reserved.pop(request_id).block_ids[::-1])

    def has_unfinished_requests(self) -> bool:
        """True while `step()` has work (held KV blocks do not count: they need no steps)."""
        return bool(self._requests or self._pending_outputs or self._in_flight is not None)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=self.scheduler.num_waiting,
            num_free_blocks=self.allocator.num_free_blocks,
            num_total_blocks=self.allocator.num_blocks,
            kv_cache_usage=self.allocator.usage,
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            finished_reasons=dict(self._finished_reasons),
            prefix_cache_queries_tokens=self.scheduler.num_prefix_cache_queries_tokens,
            prefix_cache_hits_tokens=self.scheduler.num_prefix_cache_hits_tokens,
        )

    # ---- prefill worker ----------------------------------------------------------------------

    def add_prefill_request(
        self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams
    ) -> None:
        """Prefill only: `step()` samples token #1 and finishes with the prompt's blocks held."""
        seq = self._new_sequence(request_id, prompt_token_ids, sampling_params, is_prefill_only=True)
        self.scheduler.add(seq)

    def held_block_hashes(self, request_id: str) -> list[bytes]:
        """The chained hashes of a held prefill-only request's full prompt blocks (its KV handle lists
        them so a decode worker can tell which blocks it already holds); ValueError if none is held."""
        seq = self._held.get(request_id)
        if seq is None:
            raise ValueError(f"request {request_id!r} holds no KV blocks")
        block_size = self.config.block_size
        extend_block_hashes(seq.block_hashes, seq.token_ids, seq.num_prompt_tokens, block_size)
        return seq.block_hashes[: seq.num_prompt_tokens // block_size]

    def release_kv(self, request_id: str) -> bool:
        """Frees a prefill-only request's held blocks; False if none were held (idempotent)."""
        seq = self._held.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.release(seq)
        return True

    # ---- decode worker -----------------------------------------------------------------------

    def reserve_kv(self, request_id: str, prompt_token_ids: list[int],
                   block_hashes: list[bytes] | None = None) -> KVReservation:
        """Reserves blocks for a prompt's KV before it arrives. With prefix caching the longest cached
        run of its full blocks is reused (forked; the last block is always pulled): the caller pulls
        only `reservation.pulled_block_ids`. `block_hashes`: the prompt's full-block hashes
        (`full_block_hashes`) when the caller has them already. Raises OutOfKVBlocks (holding
        nothing; retry once blocks are freed) or ValueError."""
        self._check_new_id(request_id)
        num_prompt_tokens = len(prompt_token_ids)
        if not 0 < num_prompt_tokens < self.max_model_len:
            raise ValueError(f"prompt_token_ids must have 1 to {self.max_model_len - 1} tokens, got {num_prompt_tokens}")
        self._check_token_ids("prompt_token_ids", prompt_token_ids)
        block_size = self.config.block_size
        if block_hashes is None:
            block_hashes = full_block_hashes(prompt_token_ids, block_size)
        elif len(block_hashes) != num_prompt_tokens // block_size:
            raise ValueError(f"block_hashes: {len(block_hashes)} hashes for {num_prompt_tokens // block_size} full blocks")
        block_ids, num_reused_blocks = self.scheduler.reserve_handoff(block_hashes, num_prompt_tokens)
        reservation = KVReservation(block_ids, num_reused_blocks, block_size, list(prompt_token_ids),
                                    list(block_hashes))
        self._reserved[request_id] = reservation
        return reservation

    def add_decode_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        first_token_id: int,
        sampling_params: SamplingParams,
        block_ids: list[int],
    ) -> None:
        """Starts decoding a request whose prompt KV is complete in its reserved `block_ids` (the
        reused ones held it already, the pulled ones were scattered into). Its full blocks join the
        prefix cache, prompt now and output as decode steps fill them, for a later turn to reuse."""
        reservation = self._reserved.get(request_id)
        if reservation is None or reservation.block_ids != list(block_ids):
            raise ValueError(f"block_ids of request {request_id!r} are not the ones reserve_kv returned")
        if reservation.prompt_token_ids != list(prompt_token_ids):
            raise ValueError(f"prompt_token_ids of request {request_id!r} are not the ones reserve_kv was given")
        self._check_token_ids("first_token_id", [first_token_id])
        del self._reserved[request_id]
        try:
            seq = self._new_sequence(request_id, prompt_token_ids, sampling_params)
        except ValueError:
            self._reserved[request_id] = reservation  # still reserved: the caller may abort it
            raise
        seq.append_token(first_token_id)
        seq.block_table = list(block_ids)
        seq.num_computed_tokens = seq.num_prompt_tokens
        seq.is_prompt_counted = True  # the prefill worker counted it
        seq.block_hashes = list(reservation.block_hashes)
        seq.num_cached_blocks = reservation.num_reused_blocks  # found in the prefix cache, so registered
        self.scheduler.cache_handed_off(seq)
        reason = check_finish(seq, self.scheduler.eos_token_ids, self.max_model_len)
        if reason is not None:  # token #1 already ended it: nothing to decode
            del self._requests[request_id]
            self.scheduler.release(seq)
            seq.status = SequenceStatus.FINISHED
            self._count_finish(reason)
            self._pending_outputs.append(self._final_output(seq, reason))
            return
        self.scheduler.add_prefilled(seq)

    # ---- helpers -----------------------------------------------------------------------------

    def _new_sequence(self, request_id, prompt_token_ids, sampling_params, is_prefill_only=False) -> Sequence:
        self._check_new_id(request_id)
        if not isinstance(sampling_params, SamplingParams):
            raise ValueError(f"sampling_params must be SamplingParams, got {type(sampling_params).__name__}")
        if not prompt_token_ids:
            raise ValueError("prompt_token_ids must not be empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt_token_ids has {len(prompt_token_ids)} tokens; max_model_len {self.max_model_len} "
                f"leaves no room for output"
            )
        self._check_token_ids("prompt_token_ids", prompt_token_ids)
        seq = Sequence(request_id, prompt_token_ids, sampling_params, is_prefill_only)
        self._requests[request_id] = seq
        return seq

    def _check_new_id(self, request_id: str) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty string, got {request_id!r}")
        if request_id in self._requests or request_id in self._held or request_id in self._reserved:
            raise ValueError(f"request_id {request_id!r} is already in use")

    def _check_token_ids(self, name: str, token_ids: list[int]) -> None:
        vocab_size = self.model_config.vocab_size
        for token_id in token_ids:
            if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
                raise ValueError(f"{name} has token id {token_id!r} outside [0, {vocab_size})")

    def _sampled_output(self, seq: Sequence, sample: SampledToken, num_output_tokens: int | None = None
                        ) -> RequestOutput:
        self._generation_tokens_total += 1
        if not seq.is_prompt_counted:
            seq.is_prompt_counted = True
            self._prompt_tokens_total += seq.num_prompt_tokens
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=[sample.token_id],
            new_logprobs=None if sample.logprobs is None else [sample.logprobs],
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens if num_output_tokens is None else num_output_tokens,
            kv_block_ids=list(seq.block_table) if seq.is_prefill_only else None,
        )

    def _final_output(self, seq: Sequence, reason: str) -> RequestOutput:
        return RequestOutput(seq.request_id, [], None, True, reason, seq.num_prompt_tokens, seq.num_output_tokens)

    def _count_finish(self, reason: str) -> None:
        self._finished_reasons[reason] = self._finished_reasons.get(reason, 0) + 1


def _max_model_len(config: EngineConfig, model_config) -> int:
    limit = model_config.max_position_embeddings
    if config.max_model_len is None:
        return limit
    if config.max_model_len > limit:
        raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's max_position_embeddings {limit}")
    return config.max_model_len
