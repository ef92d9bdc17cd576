"""Decode worker core: pulls a prompt's KV from a prefill worker and streams the rest of the answer.

A request moves through these stages (all state is touched on the engine thread only):

    Decode RPC ─► _admitting (FIFO; waits for free KV blocks: reserve_kv retried every loop,
                  bounded in count and time -> RESOURCE_EXHAUSTED)
      ─► _receiving (KVReceiver.begin into a buffer; polled every loop, never blocks the engine)
      ─► scatter_blocks + add_decode_request ─► _running (continuous batching in engine.step())
      ─► final message (finish reason, tokens, transfer stats)

With prefix caching, reserve_kv reuses the leading prompt blocks this worker still holds (an earlier
turn of the conversation decoded here): the handle's block hashes must equal this worker's own hashes
of the prompt ids (else INVALID_ARGUMENT), and the pull asks only for the blocks after the reused ones.

`Abort` (or the Decode call being cancelled) frees the request at any stage; a transfer in flight
is left to settle first (UCX may still write into its buffer), then its reserved blocks are freed.
The stream then ends with CANCELLED (tokens queued before the abort still go out first).

Every step's tokens for all requests reach the asyncio side in one hand-over (the engine thread's
mailbox); a stream whose writer is behind sends what queued up meanwhile as one message.

An exception while handling one request (admission, transfer, hand-off into the engine, its outputs)
fails that request only: its blocks are freed and its stream ends with the error. If the engine thread
dies anyway, every stream ends UNAVAILABLE and the service reports itself failed (`fail_service`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import AsyncIterator

from opentelemetry import trace

from common import tracing
from common.engine.outputs import RequestOutput
from common.kv import OutOfKVBlocks
from common.kv.block_count import num_blocks_for
from common.kv.block_hash import full_block_hashes
from common.tracing import Attr, SpanName, kv_reuse_attributes
from common.transfer.base import KVReceiver, TransferState
from common.transfer.errors import KVLayoutMismatch
from services.common.cache_summary import CacheSummaryPublisher
from services.common.engine_thread import AsyncSink, EngineThread
from services.common.errors import Cancelled, InvalidRequest, Overloaded, Unavailable
from services.common.observability import Observability, kv_transfer_attributes
from services.common.server import fail_service
from services.common.worker_messages import WorkerStatsData
from services.common.worker_setup import kv_layout, model_facts, refresh_worker_stats
from services.decode.jobs import DecodeFinal, DecodeJob, DecodeLimits, TokenBatch
from services.decode.local_prefill import LocalPrefills

__all__ = ["DecodeFinal", "DecodeJob", "DecodeLimits", "DecodeWorker", "TokenBatch"]

logger = logging.getLogger(__name__)


class DecodeWorker:
    def __init__(self, engine, receiver: KVReceiver, limits: DecodeLimits, observability: Observability | None = None,
                 allowed_kv_senders: frozenset[str] | None = None):
        """`allowed_kv_senders`: the only KV addresses a handle may name (None: any, logged once)."""
        self.engine = engine
        self.allowed_kv_senders = allowed_kv_senders
        self._is_any_sender_logged = False
        self.receiver = receiver
        self.limits = limits
        self.layout = kv_layout(engine)
        self.vocab_size: int = engine.model_config.vocab_size
        self.max_model_len: int = engine.max_model_len
        self.obs = observability or Observability.disabled("decode", engine.model_name)
        self.thread = EngineThread(engine, self._on_outputs, poll=self._poll, on_step_error=self._fail_running,
                                   on_death=self._on_engine_death, name="decode-engine")
        self._admitting: collections.deque[DecodeJob] = collections.deque()
        self._receiving: dict[str, DecodeJob] = {}
        self._running: dict[str, DecodeJob] = {}
        self._local_prefills = LocalPrefills(self)  # prefill_here jobs before token #1 (local_prefill.py)
        self._counters = {"served": 0, "transfers": 0, "bytes": 0, "failures": 0}
        self._facts = model_facts(engine)
        self.stats = WorkerStatsData(role="decode", is_ready=False)
        self._cache_summary = CacheSummaryPublisher(engine)  # what routers learn of its prefix cache

    @property
    def is_alive(self) -> bool:
        return self.thread.is_alive

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.stop()

    # ---- asyncio side ------------------------------------------------------------------------

    def check_handle(self, job: DecodeJob) -> None:
        """The KV handle names a sender this worker may dial and fits its layout and the prompt (checked
        before the engine thread sees it)."""
        address = job.handle.address
        if self.allowed_kv_senders is not None and address not in self.allowed_kv_senders:
            raise InvalidRequest("kv_handle.sender_address", f"{address!r} is not an allowed KV sender")
        if self.allowed_kv_senders is None and not self._is_any_sender_logged:
            self._is_any_sender_logged = True
            logger.warning("pulling KV from %s: any sender is allowed (--allowed-kv-senders limits them)", address)
        mismatch = job.handle.layout.describe_mismatch(self.layout, "prefill", "decode")
        if mismatch:
            raise KVLayoutMismatch(f"KV layout mismatch: {mismatch}")
        num_blocks = num_blocks_for(len(job.prompt_token_ids), self.layout.block_size)
        if job.handle.num_tokens != len(job.prompt_token_ids) or job.handle.num_blocks != num_blocks:
            raise InvalidRequest(
                "kv_handle", f"holds {job.handle.num_tokens} tokens in {job.handle.num_blocks} blocks, the prompt "
                             f"has {len(job.prompt_token_ids)} tokens ({num_blocks} blocks)")
        job.block_hashes = full_block_hashes(job.prompt_token_ids, self.layout.block_size)
        if list(job.handle.block_hashes) != job.block_hashes:
            raise InvalidRequest("kv_handle.block_hashes", _describe_hash_mismatch(job.handle.block_hashes,
                                                                                   job.block_hashes))

    async def decode(self, job: DecodeJob) -> AsyncIterator[list]:
        """Yields, each time the caller is ready for more, everything queued for this request: TokenBatch
        items in order, the last list ending with the DecodeFinal. Raises the request's error, after
        yielding the tokens queued before it."""
        job.trace_parent = tracing.current_context()
        sink = AsyncSink(asyncio.get_running_loop(), self.thread.mailbox)
        enqueued = self.submit(job, sink)
        is_finished = False
        try:
            await asyncio.wrap_future(enqueued)
            while not is_finished:
                items = await job.sink.get_all()
                for index, item in enumerate(items):
                    if isinstance(item, BaseException):
                        is_finished = True
                        if index:
                            yield items[:index]
                        raise item
                    if isinstance(item, DecodeFinal):
                        is_finished = True
                        items = items[: index + 1]
                        break
                yield items
        finally:
            if not is_finished:  # cancelled or closed early: free this job (runs after the enqueue)
                self.cancel(job)

    def submit(self, job: DecodeJob, sink) -> concurrent.futures.Future:
        """Queues `job`; `sink.put` gets its TokenBatch items, then a DecodeFinal or an exception (from the
        engine thread). Raises if the handle is refused; the future fails if the job could not be queued."""
        if not job.is_prefill_here:  # a prompt computed here has no handle (local_prefill.py)
            self.check_handle(job)
        job.sink = sink
        return self.thread.call(lambda: self._enqueue(job))

    def cancel(self, job: DecodeJob) -> None:
        """Frees `job` wherever it is (never another job that reused its id); runs after its enqueue."""
        self.thread.call(lambda: self._abort_job(job))

    async def abort(self, request_id: str) -> bool:
        return await self.thread.run(lambda: self._abort(request_id))

    # ---- engine thread: admission and hand-off -----------------------------------------------

    def _enqueue(self, job: DecodeJob) -> None:
        if self._is_known(job.request_id):
            raise InvalidRequest("request_id", f"{job.request_id!r} is already in use")
        if job.is_prefill_here:
            self._local_prefills.start(job)
            return
        if len(self._admitting) >= self.limits.max_num_admitting:
            raise Overloaded(f"{len(self._admitting)} hand-offs wait for KV blocks (max {self.limits.max_num_admitting})")
        self._admitting.append(job)

    def _is_known(self, request_id: str) -> bool:
        return (request_id in self._receiving or request_id in self._running
                or any(j.request_id == request_id for j in self._admitting))

    def _poll(self) -> bool:
        self._admit()
        self._local_prefills.poll()
        self._settle_transfers()
        self._refresh_stats()
        return bool(self._receiving)

    def _admit(self) -> None:
        """Reserves blocks for waiting hand-offs in arrival order and starts their pulls, while the bytes
        being pulled stay under `max_receiving_bytes`."""
        receiving_bytes = sum(job.buffer.tensor.nbytes for job in self._receiving.values() if job.buffer is not None)
        while self._admitting:
            job = self._admitting[0]
            if time.monotonic() - job.enqueued_at > self.limits.admission_timeout_seconds:
                self._admitting.popleft()
                self._finish(job, Overloaded(f"no free KV blocks for {self.limits.admission_timeout_seconds}s"))
                continue
            num_bytes = self.layout.bytes_per_block * job.handle.num_blocks  # at most: reused blocks are not pulled
            if self._receiving and receiving_bytes + num_bytes > self.limits.max_receiving_bytes:
                return  # its turn comes as pulls settle
            try:
                job.reservation = self.engine.reserve_kv(job.request_id, job.prompt_token_ids, job.block_hashes)
            except OutOfKVBlocks:
                return  # retried next loop, once steps have freed blocks
            except Exception as exc:  # noqa: BLE001 - this request fails; it holds no blocks yet
                self._admitting.popleft()
                self._finish(job, exc)
                continue
            self._admitting.popleft()
            self.obs.tracing.record_span(SpanName.DECODE_QUEUE, int(job.enqueued_at_ns), time.time_ns(),
                                         job.trace_parent, {Attr.REQUEST_ID: job.request_id})
            self._begin_pull(job)
            receiving_bytes += self.layout.bytes_per_block * job.reservation.num_pulled_blocks

    def _begin_pull(self, job: DecodeJob) -> None:
        """Pulls the blocks the reservation lacks: [reused ones | pulled ones] -> only the latter move.
        The pull starts once its buffer is ready (`_start_pull`, polled like the transfers)."""
        reservation = job.reservation
        job.kv_recv_span = self.obs.start_detached_span(SpanName.KV_RECV, job.trace_parent, {
            Attr.REQUEST_ID: job.request_id, **kv_reuse_attributes(reservation.num_reused_blocks,
                                                                   reservation.num_cached_tokens)})
        try:
            job.buffer = self.engine.kv_pool.new_transfer_buffer(reservation.num_pulled_blocks)
            self._start_pull(job)
        except Exception as exc:  # noqa: BLE001 - the RPC gets the error, the blocks are freed
            self._drop(job, exc)
            return
        self._receiving[job.request_id] = job

    def _start_pull(self, job: DecodeJob) -> None:
        """Begins the UCX pull if no queued kernel can still touch the buffer (else: next poll)."""
        if not job.buffer.is_ready():
            return
        trace_context = tracing.inject_context(trace.set_span_in_context(job.kv_recv_span))
        job.ticket = self.receiver.begin(job.handle, job.buffer.tensor, trace_context,
                                         first_block_index=job.reservation.num_reused_blocks)

    def _settle_transfers(self) -> None:
        for request_id, job in list(self._receiving.items()):
            try:
                if job.ticket is None:  # its buffer was not ready: no pull began, so an abort settles it now
                    if not job.is_aborted:
                        self._start_pull(job)
                        continue
                elif self.receiver.poll(job.ticket) is TransferState.PENDING:
                    continue
                del self._receiving[request_id]
                self._settle(job)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                logger.exception("request %s failed while its KV hand-off settled", request_id)
                self._receiving.pop(request_id, None)
                self._drop(job, exc)

    def _settle(self, job: DecodeJob) -> None:
        """A finished transfer: scatter the KV and join the running batch, or free the blocks."""
        buffer, job.buffer = job.buffer, None
        # The ticket holds the receive buffer too: drop it, or every running request would keep its
        # prompt's KV twice (on 2xH200, 500 requests held ~12 GiB of such buffers).
        ticket, job.ticket = job.ticket, None  # None: aborted before its pull began
        error = None if ticket is None else ticket.error
        if job.is_aborted or error is not None:
            self.engine.abort_request(job.request_id)  # frees the reserved blocks
            _end_spans(job, error or "aborted")
            if error is not None:
                self._counters["failures"] += 1
                self.obs.metrics.kv_transfer_failed()
                self._finish(job, error)
            return
        job.transfer = stats = ticket.stats
        self._counters["transfers"] += 1
        self._counters["bytes"] += stats.num_bytes
        self.obs.metrics.observe_kv_transfer(stats.num_bytes, stats.seconds)
        job.kv_recv_span.set_attributes(
            kv_transfer_attributes(stats.num_bytes, stats.num_blocks, stats.transport, stats.seconds))
        _end_spans(job)
        reservation = job.reservation
        job.generate_span = self.obs.start_detached_span(SpanName.DECODE_GENERATE, job.trace_parent, {
            Attr.REQUEST_ID: job.request_id, Attr.KV_BLOCKS: reservation.num_pulled_blocks,
            **kv_reuse_attributes(reservation.num_reused_blocks, reservation.num_cached_tokens)})
        self.engine.kv_pool.scatter_blocks(reservation.pulled_block_ids, buffer.tensor)
        self.engine.add_decode_request(
            job.request_id, job.prompt_token_ids, job.first_token_id, job.sampling, reservation.block_ids
        )
        job.last_token_id = job.first_token_id
        self._running[job.request_id] = job

    # ---- engine thread: outputs and endings --------------------------------------------------

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()  # one clock read per step: TTFT / ITL of every request in it
        num_new_tokens = 0
        inter_token_gaps: list[float] = []  # one per request that got a token this step
        for output in outputs:
            job = self._running.get(output.request_id)
            if job is None:
                continue
            try:
                num_new_tokens += self._stream(job, output, now, inter_token_gaps)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                logger.exception("request %s failed while streaming its output", output.request_id)
                self._running.pop(output.request_id, None)
                self._drop(job, exc)
        self.obs.metrics.add_tokens(num_generation_tokens=num_new_tokens)
        self.obs.metrics.observe_inter_token_latencies(inter_token_gaps)

    def _stream(self, job: DecodeJob, output: RequestOutput, now: float, inter_token_gaps: list[float]) -> int:
        """Hands one step's output of a request to its stream; returns its number of new tokens."""
        num_new_tokens = len(output.new_token_ids)
        if num_new_tokens:
            if job.last_token_at is None:  # the first token this worker streams (token #2 of the answer)
                self.obs.metrics.observe_time_to_first_token(now - job.enqueued_at)
            else:
                inter_token_gaps.append(now - job.last_token_at)
            job.last_token_at = now
            job.num_generated_tokens += num_new_tokens
            job.last_token_id = output.new_token_ids[-1]
            job.sink.put(TokenBatch(output.new_token_ids, output.new_logprobs))
        if output.finished:
            del self._running[output.request_id]
            job.generate_span.set_attribute(Attr.OUTPUT_TOKENS, job.num_generated_tokens)
            job.generate_span.set_attribute(Attr.FINISH_REASONS, [output.finish_reason])
            if output.finish_reason == "abort":
                _end_spans(job, "aborted")
                self._finish(job, Cancelled(f"request {output.request_id} was aborted"))
            else:
                _end_spans(job)
                self._counters["served"] += 1
                stop_token_id = job.last_token_id if output.finish_reason == "stop" else None
                self._finish(job, DecodeFinal(output.finish_reason, job.num_generated_tokens, job.transfer,
                                              stop_token_id))
        return num_new_tokens

    def _finish(self, job: DecodeJob, terminal: DecodeFinal | BaseException) -> None:
        """Ends a request's stream once (its final message or its error) and counts it as vLLM does:
        request_success_total{finished_reason} and the e2e latency from the Decode call's arrival."""
        if job.is_finished:
            return
        job.is_finished = True
        if isinstance(terminal, DecodeFinal):
            reason = terminal.finish_reason
        else:
            reason = "abort" if isinstance(terminal, Cancelled) else "error"
        self.obs.metrics.observe_request_finished(reason, time.monotonic() - job.enqueued_at)
        job.sink.put(terminal)

    def _drop(self, job: DecodeJob, error: BaseException) -> None:
        """A request failed after reserve_kv: free what the engine holds for it, end its spans and stream."""
        try:
            self.engine.abort_request(job.request_id)  # reserved or running blocks; unknown ids are ignored
        except Exception:  # noqa: BLE001 - still end the stream
            logger.exception("could not free the blocks of request %s", job.request_id)
        _end_spans(job, error)
        self._finish(job, error)

    def _abort(self, request_id: str) -> bool:
        for job in self._admitting:
            if job.request_id == request_id:
                self._admitting.remove(job)
                self._finish(job, Cancelled(f"request {request_id} was aborted"))
                return True
        job = self._receiving.get(request_id)
        if job is not None:
            job.is_aborted = True  # freed once the transfer settles (it may still write the buffer)
            self._finish(job, Cancelled(f"request {request_id} was aborted"))
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
            self._drop(job, error)

    def _on_engine_death(self, error: BaseException) -> None:
        """Something escaped the engine loop: the service is failed (NOT_SERVING, exits); end every stream."""
        fail_service(f"decode engine thread died: {type(error).__name__}: {error}")
        unavailable = Unavailable(f"decode engine stopped: {type(error).__name__}: {error}")
        jobs = [*self._admitting, *self._receiving.values(), *self._running.values()]
        self._admitting.clear()
        self._receiving.clear()
        self._running.clear()
        for job in jobs:
            self._finish(job, unavailable)

    def _refresh_stats(self) -> None:
        engine_stats = self.engine.stats()
        num_waiting = engine_stats.num_waiting + len(self._admitting) + len(self._receiving)
        self.stats = refresh_worker_stats("decode", engine_stats, self.obs.metrics, self._counters, self.layout,
                                          self._facts, num_waiting,
                                          num_queued_prompt_tokens=self._local_prefills.num_queued_prompt_tokens,
                                          **self._cache_summary.stats_fields(engine_stats))


def _describe_hash_mismatch(handle_hashes, own_hashes: list[bytes]) -> str:
    """Why a handle's block hashes are refused: missing, miscounted, or the first block that differs."""
    if not handle_hashes and own_hashes:
        return f"missing: the prompt fills {len(own_hashes)} blocks and the sender named none"
    if len(handle_hashes) != len(own_hashes):
        return f"{len(handle_hashes)} hashes, the prompt fills {len(own_hashes)} blocks"
    index = next(i for i, (theirs, ours) in enumerate(zip(handle_hashes, own_hashes)) if theirs != ours)
    return f"block {index} differs from this worker's hash of prompt_token_ids: the KV was computed for other tokens"


def _end_spans(job: DecodeJob, error: BaseException | str | None = None) -> None:
    """Ends whichever of the job's spans is open (each once)."""
    for name in ("kv_recv_span", "generate_span"):
        span = getattr(job, name)
        if span is None:
            continue
        setattr(job, name, None)
        if error is not None:
            tracing.set_error(span, error)
        span.end()
