"""Requests a decode worker prefills itself (`DecodeRequest.prefill_here`): no KV handle, no pull.

A colocated worker (`tandem worker`) takes every request this way; a decode worker takes the short
prompts the frontend keeps off the prefill workers (conditional disaggregation,
services/frontend/request_path.py). Such a request skips the hand-off stages of worker.py:

    DecodeStream/Decode (fields checked in servicer.py) ─► LocalPrefills.start (engine thread): engine.add_request; the job joins DecodeWorker._running
      ─► the engine's queue (waiting for blocks and a prefill step; bounded in time by the worker's
         admission timeout -> RESOURCE_EXHAUSTED; the pool always holds a max_model_len sequence, so
         every prompt the servicer accepts can start once blocks free up) ─► prefill step: token #1 streams like every later
         token ─► decode steps ─► final message (no transfer stats)

Abort, cancellation and the stream closing go through the worker's usual paths: the job sits in
`_running` from the start, and `engine.abort_request` frees a queued or running sequence alike.
"""

from __future__ import annotations

import time

from common.tracing import Attr, SpanName
from services.common.errors import Overloaded
from services.decode.jobs import DecodeJob


class LocalPrefills:
    """The prefill-here jobs of one DecodeWorker that have not streamed token #1 yet (engine thread only)."""

    def __init__(self, worker):
        self._worker = worker
        self._queued: list[DecodeJob] = []  # added to the engine, token #1 not out yet; arrival order

    @property
    def num_queued(self) -> int:
        return len(self._queued)

    @property
    def num_queued_prompt_tokens(self) -> int:
        return sum(len(job.prompt_token_ids) for job in self._queued)

    def start(self, job: DecodeJob) -> None:
        """Adds the whole request to the engine (ValueError naming the field on a bad prompt or sampling)."""
        worker = self._worker
        limits = worker.limits
        if len(self._queued) + len(worker._admitting) >= limits.max_num_admitting:
            raise Overloaded(f"{len(self._queued)} prompts and {len(worker._admitting)} hand-offs wait "
                             f"(max {limits.max_num_admitting})")
        worker.engine.add_request(job.request_id, job.prompt_token_ids, job.sampling)
        job.generate_span = worker.obs.start_detached_span(
            SpanName.DECODE_GENERATE, job.trace_parent,
            {Attr.REQUEST_ID: job.request_id, Attr.INPUT_TOKENS: len(job.prompt_token_ids)})
        worker._running[job.request_id] = job
        self._queued.append(job)

    def poll(self) -> None:
        """Forgets jobs that streamed token #1 or ended; fails those still queued past the admission
        timeout (their blocks, if any, are freed)."""
        if not self._queued:
            return
        worker = self._worker
        timeout_seconds = worker.limits.admission_timeout_seconds
        now = time.monotonic()
        still_queued = []
        num_prompt_tokens = 0  # of the prompts computed since the last poll
        for job in self._queued:
            if job.last_token_at is not None:
                num_prompt_tokens += len(job.prompt_token_ids)
                continue
            if job.is_finished:
                continue
            if now - job.enqueued_at > timeout_seconds:
                worker._running.pop(job.request_id, None)
                worker._drop(job, Overloaded(f"prompt not started within {timeout_seconds:g}s: no free KV "
                                             f"blocks or decode slots"))
                continue
            still_queued.append(job)
        self._queued = still_queued
        worker.obs.metrics.add_tokens(num_prompt_tokens=num_prompt_tokens)
