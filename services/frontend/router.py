"""Picks a prefill and a decode worker for each request.

Prefill: fewest prompt tokens in flight (this frontend's own accounting, exact and immediate) plus
the worker's reported queue. Decode: fewest requests in flight from this frontend, then most free
KV blocks reported. A background task polls every worker's GetStats; a worker that fails it (or is
not ready) is skipped until it answers again. No ready worker of a kind -> `Unavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from common.tls import ClientTLS
from protos import worker_pb2, worker_pb2_grpc
from services.common.errors import Unavailable
from services.common.server import channel
from services.common.worker_messages import WorkerStatsData, stats_from_pb

logger = logging.getLogger(__name__)

_STATS_TIMEOUT_SECONDS = 2.0
# A decode worker's DecodeStream gets a fixed receive window (gRPC's 64 KiB default, BDP probing off so
# it never grows): once this frontend falls behind reading it, the worker's writes wait and it merges
# the steps that queued meanwhile into one message. With BDP probing the window kept growing, the worker
# never waited, and a late frontend still read one step per message (half the tokens/s on CPU).
_DECODE_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),  # the limits services.common.server.channel sets
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.http2.lookahead_bytes", 64 * 1024),
    ("grpc.http2.bdp_probe", 0),
]


@dataclass
class WorkerHandle:
    address: str  # host:port of the worker's gRPC server
    role: str  # "prefill" | "decode"
    stub: worker_pb2_grpc.PrefillWorkerStub | worker_pb2_grpc.DecodeWorkerStub
    channel: grpc.aio.Channel
    stats: WorkerStatsData | None = None  # last GetStats answer
    is_healthy: bool = False
    num_inflight_requests: int = 0  # requests this frontend has on the worker
    num_inflight_prompt_tokens: int = 0
    num_routed: int = field(default=0)  # requests routed here since start

    def prefill_score(self) -> tuple[int, int]:
        reported = self.stats.num_queued_prompt_tokens if self.stats else 0
        return (self.num_inflight_prompt_tokens, reported)

    def decode_score(self) -> tuple[int, int]:
        free_blocks = self.stats.num_free_blocks if self.stats else 0
        return (self.num_inflight_requests, -free_blocks)


class Router:
    def __init__(self, prefill_addresses: list[str], decode_addresses: list[str], refresh_seconds: float = 0.5,
                 interceptors: list | None = None, tls: ClientTLS | None = None):
        """`interceptors`: client interceptors (tracing) for every worker channel; `tls`: dial every worker
        over TLS (its unary calls, GetStats and the DecodeStream all share the one channel)."""
        if not decode_addresses:  # without prefill workers, decode-side workers prefill every prompt
            raise ValueError("at least one decode address is required")
        self._interceptors = list(interceptors or [])
        self._tls = tls
        self.prefill_workers = [self._connect(a, "prefill") for a in prefill_addresses]
        self.decode_workers = [self._connect(a, "decode") for a in decode_addresses]
        self._refresh_seconds = refresh_seconds
        self._refresh_task: asyncio.Task | None = None
        # rotate among equally loaded workers, one counter per kind so picks of one kind never skew the other
        self._tie_breakers = {"prefill": itertools.count(), "decode": itertools.count()}

    def _connect(self, address: str, role: str) -> WorkerHandle:
        if role == "decode":
            ch = channel(address, self._interceptors, self._tls, options=_DECODE_CHANNEL_OPTIONS)
        else:
            ch = channel(address, self._interceptors, self._tls)
        stub_type = worker_pb2_grpc.PrefillWorkerStub if role == "prefill" else worker_pb2_grpc.DecodeWorkerStub
        return WorkerHandle(address, role, stub_type(ch), ch)

    @property
    def workers(self) -> list[WorkerHandle]:
        return [*self.prefill_workers, *self.decode_workers]

    async def refresh(self) -> None:
        """Polls every worker's stats once (concurrently)."""
        await asyncio.gather(*(self._refresh_one(w) for w in self.workers))

    async def _refresh_one(self, worker: WorkerHandle) -> None:
        try:
            pb = await worker.stub.GetStats(worker_pb2.GetStatsRequest(), timeout=_STATS_TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:
            if worker.is_healthy:
                logger.warning("%s worker %s unreachable: %s", worker.role, worker.address, exc.code().name)
            worker.is_healthy = False
            return
        worker.stats = stats_from_pb(pb)
        worker.is_healthy = worker.stats.is_ready and worker.stats.role == worker.role

    async def _refresh_forever(self) -> None:
        while True:
            await self.refresh()
            await asyncio.sleep(self._refresh_seconds)

    def start(self) -> None:
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task
        for worker in self.workers:
            await worker.channel.close()

    def is_ready(self) -> bool:
        """A decode-side worker answers, and a prefill worker too if the cluster has any."""
        is_prefill_ready = not self.prefill_workers or any(w.is_healthy for w in self.prefill_workers)
        return is_prefill_ready and any(w.is_healthy for w in self.decode_workers)

    def model_limits(self) -> WorkerStatsData:
        """Stats of a ready worker (model facts: max_model_len, vocab size, EOS ids); the smallest context wins."""
        ready = [w.stats for w in self.workers if w.is_healthy and w.stats is not None]
        if not ready:
            raise Unavailable("no ready worker")
        return min(ready, key=lambda s: s.max_model_len)

    def _pick(self, workers: list[WorkerHandle], score) -> WorkerHandle:
        healthy = [w for w in workers if w.is_healthy]
        if not healthy:
            kind = workers[0].role
            raise Unavailable(f"no {kind} worker is ready ({', '.join(w.address for w in workers)})")
        best = min(score(w) for w in healthy)
        tied = [w for w in healthy if score(w) == best]
        return tied[next(self._tie_breakers[workers[0].role]) % len(tied)]

    def pick_prefill(self) -> WorkerHandle:
        return self._pick(self.prefill_workers, WorkerHandle.prefill_score)

    def pick_decode(self) -> WorkerHandle:
        return self._pick(self.decode_workers, WorkerHandle.decode_score)

    @contextlib.contextmanager
    def track(self, worker: WorkerHandle, num_prompt_tokens: int = 0) -> Iterator[None]:
        """Counts a request against `worker` while it is there."""
        worker.num_inflight_requests += 1
        worker.num_inflight_prompt_tokens += num_prompt_tokens
        worker.num_routed += 1
        try:
            yield
        finally:
            worker.num_inflight_requests -= 1
            worker.num_inflight_prompt_tokens -= num_prompt_tokens

    def mark_unhealthy(self, worker: WorkerHandle) -> None:
        """After an UNAVAILABLE answer: skip the worker until the next successful GetStats."""
        worker.is_healthy = False
