"""Prefill worker core: computes prompts, samples token #1, holds the KV until a decode worker pulls it.

A request moves through these stages (all state is touched on the engine thread only):

    Prefill RPC ─► _waiting (engine queue; batched by --max-num-batched-tokens) ─► step: token #1
      ├─ token #1 ends the request (EOS / stop token / max_tokens 1): release_kv, answer finish_reason
      └─ otherwise: KVSender.offer (lease) ─► _leases ─► answer with the KV handle (its full
         blocks' hashes included: a decode worker pulls only the blocks its prefix cache lacks)
    on_release (decode acked: DONE | lease ran out: EXPIRED | refused: FAILED | Abort: CANCELLED)
      ─► release_kv: the blocks return to the pool

`Abort` (or the Prefill call being cancelled) removes a request from whichever stage holds it.

Answers reach the asyncio side through the engine thread's mailbox: one hand-over per engine loop
iteration for a whole batch of token #1s. Metrics: TTFT (arrival -> token #1) for every request;
request_success and e2e latency for those that end here (token #1 finished them, or they were aborted
or failed before a hand-off); the decode worker counts the handed-off ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from common.engine.outputs import RequestOutput
from common.engine.sampling_params import SamplingParams
from common.engine.sequence import TokenLogprobs
from common import tracing
from common.tracing import Attr, SpanName, kv_reuse_attributes
from common.transfer.base import KVSender, TransferOutcome
from common.transfer.handle import KVHandle, TransferStats, new_transfer_id
from services.common.cache_summary import CacheSummaryPublisher
from services.common.engine_thread import EngineThread
from services.common.errors import Cancelled, Overloaded, Unavailable
from services.common.observability import Observability, kv_transfer_attributes
from services.common.server import fail_service
from services.common.worker_messages import WorkerStatsData
from services.common.worker_setup import kv_layout, model_facts, refresh_worker_stats

logger = logging.getLogger(__name__)


@dataclass
class PrefillResult:
    first_token_id: int
    first_logprobs: TokenLogprobs | None
    finish_reason: str | None  # "stop" | "length" when token #1 ended the request, else None
    kv_handle: KVHandle | None  # set when finish_reason is None


@dataclass
class _Waiting:
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future  # resolved with a PrefillResult (or an exception) from the engine thread
    num_prompt_tokens: int
    trace_parent: Any = None  # the Prefill RPC's trace context, parent of this request's engine spans
    enqueued_ns: int = field(default_factory=time.time_ns)
    arrived_at: float = field(default_factory=time.monotonic)  # TTFT and e2e latency start here
    transfer_id: str | None = None  # set once the KV is offered


def _settle(answer: tuple[asyncio.Future, PrefillResult | None, BaseException | None]) -> None:
    """On the caller's loop: resolves a Prefill call's future (once)."""
    future, result, error = answer
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


DEFAULT_KV_LEASE_SECONDS = 60.0  # a prompt's KV is freed if no decode worker pulled it within this time
DEFAULT_MAX_NUM_WAITING = 1024  # queued prompts before RESOURCE_EXHAUSTED


class PrefillWorker:
    def __init__(self, engine, lease_seconds: float = DEFAULT_KV_LEASE_SECONDS,
                 max_num_waiting: int = DEFAULT_MAX_NUM_WAITING,
                 observability: Observability | None = None):
        if lease_seconds <= 0:
            raise ValueError(f"kv_lease_seconds: must be > 0, got {lease_seconds}")
        self.engine = engine
        self.lease_seconds = lease_seconds
        self.max_num_waiting = max_num_waiting
        self.sender: KVSender | None = None  # attached once created (it needs `on_release`)
        self.thread = EngineThread(engine, self._on_outputs, poll=self._refresh_stats, on_step_error=self._fail_all,
                                   on_death=self._on_engine_death, name="prefill-engine")
        self.vocab_size: int = engine.model_config.vocab_size
        self.max_model_len: int = engine.max_model_len
        self._waiting: dict[str, _Waiting] = {}
        self._leases: dict[str, str] = {}  # request id -> transfer id
        self._lease_owners: dict[str, str] = {}  # transfer id -> request id
        self._counters = {"served": 0, "transfers": 0, "bytes": 0, "failures": 0}
        self.stats = WorkerStatsData(role="prefill", is_ready=False)
        self._cache_summary = CacheSummaryPublisher(engine)  # what routers learn of its prefix cache
        self._facts = model_facts(engine)
        self.layout = kv_layout(engine)
        self.obs = observability or Observability.disabled("prefill", engine.model_name)
        self._trace_parents: dict[str, Any] = {}  # transfer id -> trace context of its Prefill RPC

    def attach_sender(self, sender: KVSender) -> None:
        self.sender = sender

    @property
    def is_alive(self) -> bool:
        return self.thread.is_alive

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.thread.stop()

    # ---- asyncio side ------------------------------------------------------------------------

    async def prefill(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams) -> PrefillResult:
        loop = asyncio.get_running_loop()
        waiting = _Waiting(loop, loop.create_future(), len(prompt_token_ids), tracing.current_context())
        added = self.thread.call(lambda: self._add(request_id, prompt_token_ids, sampling, waiting))
        try:
            await asyncio.wrap_future(added)
            return await waiting.future
        except asyncio.CancelledError:  # the caller went away: free whatever this call holds (runs after the add)
            self.thread.call(lambda: self._abort_own(request_id, waiting))
            raise

    async def abort(self, request_id: str) -> bool:
        return await self.thread.run(lambda: self._abort(request_id))

    def on_release(self, transfer_id: str, outcome: TransferOutcome, stats: TransferStats) -> None:
        """Sender callback (its own thread): the blocks of an offer can be freed."""
        self.thread.call(lambda: self._release(transfer_id, outcome, stats))

    # ---- engine thread -----------------------------------------------------------------------

    def _add(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, waiting: _Waiting) -> None:
        if len(self._waiting) >= self.max_num_waiting:
            raise Overloaded(f"{len(self._waiting)} prompts queued (max_num_waiting={self.max_num_waiting})")
        if request_id in self._leases:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        self.engine.add_prefill_request(request_id, prompt_token_ids, sampling)  # ValueError names the field
        self._waiting[request_id] = waiting

    def _resolve(self, waiting: _Waiting, result: PrefillResult | None = None,
                 error: BaseException | None = None) -> None:
        """Answers a Prefill call (delivered with the rest of this engine loop iteration's answers)."""
        self.thread.mailbox.post(waiting.loop, _settle, (waiting.future, result, error))

    def _end_here(self, waiting: _Waiting, finished_reason: str, now: float | None = None) -> None:
        """Counts a request that ends on this worker (request_success_total, e2e latency)."""
        now = time.monotonic() if now is None else now
        self.obs.metrics.observe_request_finished(finished_reason, now - waiting.arrived_at)

    def _on_outputs(self, outputs: list[RequestOutput]) -> None:
        now = time.monotonic()  # token #1 of every request in this step
        for output in outputs:
            waiting = self._waiting.pop(output.request_id, None)
            if waiting is None:
                continue
            if output.finish_reason == "abort":
                self._end_here(waiting, "abort", now)
                self._resolve(waiting, error=Cancelled(f"request {output.request_id} was aborted"))
                continue
            try:
                self.obs.metrics.observe_time_to_first_token(now - waiting.arrived_at)
                self._record_engine_spans(output, waiting)
                result = self._finish_prefill(output, waiting)
            except Exception as exc:  # noqa: BLE001 - the RPC gets the error, the blocks are freed
                logger.exception("request %s failed after its prefill", output.request_id)
                self.engine.release_kv(output.request_id)
                self._end_here(waiting, "error", now)
                self._resolve(waiting, error=exc)
                continue
            self._counters["served"] += 1
            if result.finish_reason is not None:  # token #1 ended it: nothing is handed off
                self._end_here(waiting, result.finish_reason, now)
            self._resolve(waiting, result)

    def _finish_prefill(self, output: RequestOutput, waiting: _Waiting) -> PrefillResult:
        first_token_id = output.new_token_ids[0]
        first_logprobs = output.new_logprobs[0] if output.new_logprobs else None
        if output.finish_reason is not None:  # token #1 ended the request: nobody will pull
            self.engine.release_kv(output.request_id)
            return PrefillResult(first_token_id, first_logprobs, output.finish_reason, None)
        transfer_id = new_transfer_id()
        # The handle lists the full blocks' hashes: a decode worker pulls only the blocks it lacks.
        block_hashes = self.engine.held_block_hashes(output.request_id)
        handle = self.sender.offer(transfer_id, output.kv_block_ids, output.num_prompt_tokens, self.lease_seconds,
                                   block_hashes=block_hashes)
        self._leases[output.request_id] = transfer_id
        self._lease_owners[transfer_id] = output.request_id
        waiting.transfer_id = transfer_id
        self._trace_parents[transfer_id] = waiting.trace_parent
        return PrefillResult(first_token_id, first_logprobs, None, handle)

    def _abort(self, request_id: str) -> bool:
        waiting = self._waiting.pop(request_id, None)
        if waiting is not None:
            self.engine.abort_request(request_id)
            self._end_here(waiting, "abort")
            self._resolve(waiting, error=Cancelled(f"request {request_id} was aborted"))
            return True
        transfer_id = self._leases.get(request_id)
        if transfer_id is not None:
            self.sender.cancel(transfer_id)  # on_release(CANCELLED) frees the blocks
            return True
        return False

    def _abort_own(self, request_id: str, waiting: _Waiting) -> None:
        """Aborts what one Prefill call holds, never another call that reused the id."""
        if self._waiting.get(request_id) is waiting or (
            waiting.transfer_id is not None and waiting.transfer_id in self._lease_owners
        ):
            self._abort(request_id)

    def _release(self, transfer_id: str, outcome: TransferOutcome, stats: TransferStats) -> None:
        request_id = self._lease_owners.pop(transfer_id, None)
        if request_id is None:
            return
        self._leases.pop(request_id, None)
        self.engine.release_kv(request_id)
        trace_parent = self._trace_parents.pop(transfer_id, None)
        if outcome is TransferOutcome.DONE:
            self._counters["transfers"] += 1
            self._counters["bytes"] += stats.num_bytes
            self.obs.metrics.observe_kv_transfer(stats.num_bytes, stats.seconds)
            self._record_kv_send(stats, trace_parent)
        elif outcome in (TransferOutcome.EXPIRED, TransferOutcome.FAILED):
            self._counters["failures"] += 1
            self.obs.metrics.kv_transfer_failed()
            logger.warning("KV of request %s released: %s", request_id, outcome.value)

    def _record_engine_spans(self, output: RequestOutput, waiting: _Waiting) -> None:
        """prefill.queue (enqueued -> its batch started) and prefill.forward (that batch), after the fact."""
        step_started_ns, step_ended_ns = self.thread.step_started_ns, self.thread.step_ended_ns
        attributes = {Attr.REQUEST_ID: output.request_id, Attr.INPUT_TOKENS: output.num_prompt_tokens}
        self.obs.tracing.record_span(SpanName.PREFILL_QUEUE, min(waiting.enqueued_ns, step_started_ns),
                                     step_started_ns, waiting.trace_parent, attributes)
        self.obs.tracing.record_span(SpanName.PREFILL_FORWARD, step_started_ns, step_ended_ns,
                                     waiting.trace_parent, attributes)
        self.obs.metrics.add_tokens(num_prompt_tokens=output.num_prompt_tokens)

    def _record_kv_send(self, stats: TransferStats, trace_parent) -> None:
        """kv.send: a child of the decode side's kv.recv when the pull carried its context."""
        parent = tracing.extract_context(stats.peer_trace_context) if stats.peer_trace_context else trace_parent
        end_ns = time.time_ns()
        self.obs.tracing.record_span(
            SpanName.KV_SEND, end_ns - int(stats.seconds * 1e9), end_ns, parent,
            {**kv_transfer_attributes(stats.num_bytes, stats.num_blocks, stats.transport, stats.seconds),
             **kv_reuse_attributes(stats.num_reused_blocks, stats.num_reused_blocks * self.layout.block_size)},
        )

    def _fail_all(self, error: BaseException) -> None:
        """A step raised (a bug): fail every queued prompt rather than leave callers hanging."""
        for request_id in list(self._waiting):
            waiting = self._waiting.pop(request_id)
            self.engine.abort_request(request_id)
            self._end_here(waiting, "error")
            self._resolve(waiting, error=error)

    def _on_engine_death(self, error: BaseException) -> None:
        """Something escaped the engine loop: the service is failed (NOT_SERVING, exits); answer every call."""
        fail_service(f"prefill engine thread died: {type(error).__name__}: {error}")
        unavailable = Unavailable(f"prefill engine stopped: {type(error).__name__}: {error}")
        waiting, self._waiting = list(self._waiting.values()), {}
        for one in waiting:
            self._end_here(one, "error")
            self._resolve(one, error=unavailable)

    def _refresh_stats(self) -> bool:
        engine_stats = self.engine.stats()
        self.stats = refresh_worker_stats(
            "prefill", engine_stats, self.obs.metrics, self._counters, self.layout, self._facts,
            engine_stats.num_waiting,
            num_queued_prompt_tokens=sum(w.num_prompt_tokens for w in self._waiting.values()),
            num_held_leases=len(self._leases),
            **self._cache_summary.stats_fields(engine_stats),
        )
        return False
