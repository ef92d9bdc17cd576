"""Decode worker core: pulls a prompt's KV from a prefill worker and streams the rest of the answer.

A request moves through these stages (all state is touched on the engine thread only):

    Decode RPC ─► _admitting (FIFO; waits for free KV blocks: reserve_kv retried every loop,
                  bounded in count and time -> RESOURCE_EXHAUSTED)
      ─► _receiving (KVReceiver.begin into a buffer; polled every loop, never blocks the engine)
      ─► scatter_blocks + add_decode_request ─► _running (continuous batching in engine.step())
      ─► final message (finish reason, tokens, transfer stats)

`Abort` (or the Decode call being cancelled) frees the request at any stage; a transfer in flight
is left to settle first (UCX may still write into its buffer), then its reserved blocks are freed.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from opentelemetry import trace

from common.engine.outputs import RequestOutput
from common.engine.sampling_params import SamplingParams
from common.engine.sequence import TokenLogprobs
from common import tracing
from common.kv import OutOfKVBlocks
from common.tracing import Attr, SpanName
from common.transfer.base import KVHandle, KVLayoutMismatch, KVReceiver, TransferState, TransferStats, TransferTicket
from services.common.engine_thread import AsyncSink, EngineThread
from services.common.errors import Cancelled, Overloaded
from services.common.observability import Observability, kv_transfer_attributes
from services.common.worker_messages import WorkerStatsData
from services.common.worker_setup import kv_layout, model_facts, refresh_worker_stats

logger = logging.getLogger(__name__)


@dataclass
class TokenBatch:
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None


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
    first_token_id: int
    sampling: SamplingParams
    handle: KVHandle
    sink: AsyncSink  # TokenBatch* then DecodeFinal, or an exception
    enqueued_at: float = field(default_factory=time.monotonic)
    enqueued_at_ns: int = field(default_factory=time.time_ns)  # wall clock, for the decode.queue span
    block_ids: list[int] | None = None  # reserved blocks, once admitted
    ticket: TransferTicket | None = None
    buffer: torch.Tensor | None = None  # [L, 2, n, BS, Hkv, D] the pull lands in
    transfer: TransferStats | None = None
    num_generated_tokens: int = 1
    last_token_id: int | None = None
    is_aborted: bool = False
    trace_parent: Any = None  # the Decode RPC's trace context, parent of this request's spans
    kv_recv_span: Any = None  # open while the KV is being pulled
    generate_span: Any = None  # open while the request decodes


@dataclass
class DecodeLimits:
    max_num_admitting: int = 256  # hand-offs waiting for KV blocks before RESOURCE_EXHAUSTED
    admission_timeout_seconds: float = 30.0  # longest wait for free KV blocks

    def __post_init__(self) -> None:
        if self.max_num_admitting < 1:
            raise ValueError(f"max_num_admitting: must be >= 1, got {self.max_num_admitting}")
        if self.admission_timeout_seconds <= 0:
            raise ValueError(f"admission_timeout_seconds: must be > 0, got {self.admission_timeout_seconds}")


class DecodeWorker:
    def __init__(self, engine, receiver: KVReceiver, limits: DecodeLimits, observability: Observability | None = None):
        self.engine = engine
        self.receiver = receiver
        self.limits = limits
        self.layout = kv_layout(engine)
        self.obs = observability or Observability.disabled("decode", engine.model_name)
        self.thread = EngineThread(engine, self._on_outputs, poll=self._poll, on_step_error=self._fail_running,
                                   name="decode-engine")
        self._admitting: collections.deque[DecodeJob] = collections.deque()
        self._receiving: dict[str, DecodeJob] = {}
        self._running: dict[str, DecodeJob] = {}
        self._counters = {"served": 0, "transfers": 0, "bytes": 0, "failures": 0}
        self._facts = model_facts(engine)
        self.stats = WorkerStatsData(role="decode", is_ready=False)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.stop()

    # ---- asyncio side ------------------------------------------------------------------------

    async def decode(self, job: DecodeJob):
        """Yields TokenBatch* then one DecodeFinal; raises the request's error."""
        job.trace_parent = tracing.current_context()
        enqueued = self.thread.call(lambda: self._enqueue(job))
        is_finished = False
        try:
            await asyncio.wrap_future(enqueued)
            while not is_finished:
                item = await job.sink.get()
                if isinstance(item, BaseException):
                    is_finished = True
                    raise item
                is_finished = isinstance(item, DecodeFinal)
                yield item
        finally:
            if not is_finished:  # cancelled or closed early: free this job (runs after the enqueue)
                self.thread.call(lambda: self._abort_job(job))

    async def abort(self, request_id: str) -> bool:
        return await self.thread.run(lambda: self._abort(request_id))

    # ---- engine thread -----------------------------------------------------------------------

    def _enqueue(self, job: DecodeJob) -> None:
        mismatch = job.handle.layout.describe_mismatch(self.layout, "prefill", "decode")
        if mismatch:
            raise KVLayoutMismatch(f"KV layout mismatch: {mismatch}")
        num_blocks = -(-len(job.prompt_token_ids) // self.layout.block_size)
        if job.handle.num_tokens != len(job.prompt_token_ids) or job.handle.num_blocks != num_blocks:
            raise ValueError(
                f"kv_handle: holds {job.handle.num_tokens} tokens in {job.handle.num_blocks} blocks, the prompt has "
                f"{len(job.prompt_token_ids)} tokens ({num_blocks} blocks)"
            )
        if self._is_known(job.request_id):
            raise ValueError(f"request_id: {job.request_id!r} is already in use")
        if len(self._admitting) >= self.limits.max_num_admitting:
            raise Overloaded(f"{len(self._admitting)} hand-offs wait for KV blocks (max {self.limits.max_num_admitting})")
        self._admitting.append(job)

    def _is_known(self, request_id: str) -> bool:
        return (request_id in self._receiving or request_id in self._running
                or any(j.request_id == request_id for j in self._admitting))

    def _poll(self) -> bool:
        self._admit()
        self._settle_transfers()
        self._refresh_stats()
        return bool(self._receiving)

    def _admit(self) -> None:
        """Reserves blocks for waiting hand-offs in arrival order and starts their pulls."""
        while self._admitting:
            job = self._admitting[0]
            if time.monotonic() - job.enqueued_at > self.limits.admission_timeout_seconds:
                self._admitting.popleft()
                job.sink.put(Overloaded(f"no free KV blocks for {self.limits.admission_timeout_seconds}s"))
                continue
            try:
                job.block_ids = self.engine.reserve_kv(job.request_id, len(job.prompt_token_ids))
            except OutOfKVBlocks:
                return  # retried next loop, once steps have freed blocks
            except ValueError as exc:
                self._admitting.popleft()
                job.sink.put(exc)
                continue
            self._admitting.popleft()
            self.obs.tracing.record_span(SpanName.DECODE_QUEUE, int(job.enqueued_at_ns), time.time_ns(),
                                         job.trace_parent, {Attr.REQUEST_ID: job.request_id})
            self._begin_pull(job)

    def _begin_pull(self, job: DecodeJob) -> None:
        job.buffer = torch.empty(self.layout.transfer_shape(job.handle.num_blocks), dtype=self.layout.torch_dtype,
                                 device=self.engine.kv_pool.device)
        job.kv_recv_span = self.obs.start_detached_span(SpanName.KV_RECV, job.trace_parent,
                                                        {Attr.REQUEST_ID: job.request_id})
        trace_context = tracing.inject_context(trace.set_span_in_context(job.kv_recv_span))
        try:
            job.ticket = self.receiver.begin(job.handle, job.buffer, trace_context)
        except Exception as exc:  # noqa: BLE001 - the RPC gets the error, the blocks are freed
            self.engine.abort_request(job.request_id)
            _end_span(job.kv_recv_span, exc)
            job.sink.put(exc)
            return
        self._receiving[job.request_id] = job

    def _settle_transfers(self) -> None:
        for request_id, job in list(self._receiving.items()):
            if self.receiver.poll(job.ticket) is TransferState.PENDING:
                continue
            del self._receiving[request_id]
            buffer, job.buffer = job.buffer, None
            if job.is_aborted or job.ticket.error is not None:
                self.engine.abort_request(request_id)  # frees the reserved blocks
                _end_span(job.kv_recv_span, job.ticket.error or "aborted")
                if job.ticket.error is not None:
                    self._counters["failures"] += 1
                    self.obs.metrics.kv_transfer_failed()
                    job.sink.put(job.ticket.error)
                continue
            job.transfer = stats = job.ticket.stats
            self._counters["transfers"] += 1
            self._counters["bytes"] += stats.num_bytes
            self.obs.metrics.observe_kv_transfer(stats.num_bytes, stats.seconds)
            job.kv_recv_span.set_attributes(
                kv_transfer_attributes(stats.num_bytes, stats.num_blocks, stats.transport, stats.seconds))
            _end_span(job.kv_recv_span)
            job.generate_span = self.obs.start_detached_span(SpanName.DECODE_GENERATE, job.trace_parent,
                                                             {Attr.REQUEST_ID: request_id})
            self.engine.kv_pool.scatter_blocks(job.block_ids, buffer)
            self.engine.add_decode_request(
                request_id, job.prompt_token_ids, job.first_token_id, job.sampling, job.block_ids
            )
            job.last_token_id = job.first_token_id
            self._running[request_id] = job

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            job = self._running.get(output.request_id)
            if job is None:
                continue
            if output.new_token_ids:
                self.obs.metrics.add_tokens(num_generation_tokens=len(output.new_token_ids))
                job.num_generated_tokens += len(output.new_token_ids)
                job.last_token_id = output.new_token_ids[-1]
                job.sink.put(TokenBatch(list(output.new_token_ids), output.new_logprobs))
            if not output.finished:
                continue
            del self._running[output.request_id]
            job.generate_span.set_attribute(Attr.OUTPUT_TOKENS, job.num_generated_tokens)
            job.generate_span.set_attribute(Attr.FINISH_REASONS, [output.finish_reason])
            _end_span(job.generate_span, "aborted" if output.finish_reason == "abort" else None)
            if output.finish_reason == "abort":
                job.sink.put(Cancelled(f"request {output.request_id} was aborted"))
                continue
            self._counters["served"] += 1
            stop_token_id = job.last_token_id if output.finish_reason == "stop" else None
            job.sink.put(DecodeFinal(output.finish_reason, job.num_generated_tokens, job.transfer, stop_token_id))

    def _abort(self, request_id: str) -> bool:
        for job in self._admitting:
            if job.request_id == request_id:
                self._admitting.remove(job)
                job.sink.put(Cancelled(f"request {request_id} was aborted"))
                return True
        job = self._receiving.get(request_id)
        if job is not None:
            job.is_aborted = True  # freed once the transfer settles (it may still write the buffer)
            job.sink.put(Cancelled(f"request {request_id} was aborted"))
            return True
        if request_id in self._running:
            self.engine.abort_request(request_id)  # its "abort" output ends the stream
            return True
        return False

    def _abort_job(self, job: DecodeJob) -> None:
        """Aborts this job wherever it is, never another job that reused its id."""
        registered = self._receiving.get(job.request_id) or self._running.get(job.request_id)
        if registered is job or any(waiting is job for waiting in self._admitting):
            self._abort(job.request_id)

    def _fail_running(self, error: BaseException) -> None:
        """A step raised (a bug): end every running stream with the error and free its blocks."""
        for request_id, job in list(self._running.items()):
            del self._running[request_id]
            _end_span(job.generate_span, error)
            self.engine.abort_request(request_id)
            job.sink.put(error)

    def _refresh_stats(self) -> None:
        engine_stats = self.engine.stats()
        num_waiting = engine_stats.num_waiting + len(self._admitting) + len(self._receiving)
        self.stats = refresh_worker_stats("decode", engine_stats, self.obs.metrics, self._counters, self.layout,
                                          self._facts, num_waiting)


def _end_span(span, error: BaseException | str | None = None) -> None:
    if span is None:
        return
    if error is not None:
        tracing.set_error(span, error)
    span.end()
