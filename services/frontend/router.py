"""Picks a prefill and a decode worker for each request.

The policy (`--router-mode`, services/frontend/routing_policy.py) sees, per healthy worker, what the
request lacks there and the load already there. Load: prefill, prompt tokens in flight (this frontend's
own accounting, exact and immediate) plus the worker's reported queue; decode, requests in flight from
this frontend, then most free KV blocks reported (the `load` mode's ordering), and for the `kv` mode the
KV blocks in use (reported, plus those routed there since). What a worker holds comes from the cache
summary in its GetStats and from the requests routed to it since (services/frontend/cache_view.py).

A background task polls every worker's GetStats; a worker that fails it (or is not ready) is skipped
until it answers again, and what it had cached is forgotten. No ready worker of a kind -> `Unavailable`.

Workers come and go while the frontend runs (services/frontend/discovery.py): `add_worker` routes to a
new one from its first ready GetStats on; `retire_worker` drains one: no new request goes there, the
requests in flight finish on it, and its channel closes once none is left (`on_worker_closed` callbacks
run first: the app has the relay drop its DecodeStream to it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from opentelemetry import trace

from common.kv.block_count import num_blocks_for
from common.tls import ClientTLS
from protos import worker_pb2, worker_pb2_grpc
from services.common.errors import Unavailable
from services.common.server import channel
from services.common.worker_messages import WorkerStatsData, stats_from_pb
from services.frontend.cache_view import CacheViewLimits, PromptKeys, WorkerCacheView
from services.frontend.router_metrics import RouterMetrics
from services.frontend.routing_policy import Candidate, RouterMode, RoutingConfig, choose

logger = logging.getLogger(__name__)

_STATS_TIMEOUT_SECONDS = 2.0
_FALLBACK_BLOCK_SIZE = 16  # a worker that has not reported its KV layout (nothing cached is known)
# A drained worker's channel closes this long after its last request ended, and lets RPCs still on it
# (the background Aborts a request's end sends) finish for as long again.
_RETIRED_CLOSE_GRACE_SECONDS = 5.0
ROLES = ("prefill", "decode")
ROUTE_CACHED_TOKENS = "tandem.route.cached_tokens"  # `route` span: prompt tokens the picked worker holds
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
    cache_view: WorkerCacheView = field(default_factory=WorkerCacheView)  # what it is believed to hold
    num_blocks_routed_since_stats: int = 0  # decode: prompt blocks sent here since its last GetStats
    idle_since: float | None = None  # retired (draining): when it was last seen with no request in flight

    @property
    def block_size(self) -> int:
        layout = self.stats.layout if self.stats is not None else None
        return layout.block_size if layout is not None else _FALLBACK_BLOCK_SIZE

    def prefill_score(self) -> tuple[int, int]:
        reported = self.stats.num_queued_prompt_tokens if self.stats else 0
        return (self.num_inflight_prompt_tokens, reported)

    def decode_score(self) -> tuple[int, int]:
        free_blocks = self.stats.num_free_blocks if self.stats else 0
        return (self.num_inflight_requests, -free_blocks)


@dataclass(frozen=True)
class RouteChoice:
    """One worker pick before it is recorded (`Router.choose_decode`, then `Router.commit`)."""

    role: str  # "prefill" | "decode"
    worker: WorkerHandle
    prompt: PromptKeys  # the request's prompt and its block keys
    num_cached_blocks: int  # the prompt's leading blocks the worker is believed to hold
    is_cache_aware: bool  # kv mode with a prompt: the choice counted cached blocks


class Router:
    def __init__(self, prefill_addresses: list[str], decode_addresses: list[str], refresh_seconds: float = 0.5,
                 interceptors: list | None = None, tls: ClientTLS | None = None,
                 routing: RoutingConfig | None = None, metrics: RouterMetrics | None = None,
                 cache_limits: CacheViewLimits | None = None, clock: Callable[[], float] = time.monotonic):
        """`interceptors`: client interceptors (tracing) for every worker channel; `tls`: dial every worker
        over TLS (its unary calls, GetStats and the DecodeStream all share the one channel); `routing`: the
        policy (default: cache-aware); `metrics`: where decisions are counted; `cache_limits` and `clock`:
        how worker cache summaries are bounded and aged. Without prefill addresses, decode-side workers
        prefill every prompt; with none of either, workers arrive through `add_worker`."""
        self._interceptors = list(interceptors or [])
        self._tls = tls
        self.routing = routing or RoutingConfig()
        self._metrics = metrics
        self._cache_limits = cache_limits or CacheViewLimits()
        self._clock = clock
        self.prefill_workers = [self._connect(a, "prefill") for a in prefill_addresses]
        self.decode_workers = [self._connect(a, "decode") for a in decode_addresses]
        self.retired_workers: list[WorkerHandle] = []  # draining: in flight requests finish, none is added
        self.on_worker_closed: list[Callable[[WorkerHandle], None]] = []  # called as a retired worker closes
        self._refresh_seconds = refresh_seconds
        self._refresh_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()  # first GetStats of added workers, channel closes
        # round-robin turns and rotation among ties, one counter per kind so picks of one kind never skew
        # the other
        self._turns = {"prefill": itertools.count(), "decode": itertools.count()}
        self._rng = random.Random()

    def _connect(self, address: str, role: str) -> WorkerHandle:
        if role == "decode":
            ch = channel(address, self._interceptors, self._tls, options=_DECODE_CHANNEL_OPTIONS)
        else:
            ch = channel(address, self._interceptors, self._tls)
        stub_type = worker_pb2_grpc.PrefillWorkerStub if role == "prefill" else worker_pb2_grpc.DecodeWorkerStub
        view = WorkerCacheView(self._cache_limits, self._clock)
        return WorkerHandle(address, role, stub_type(ch), ch, cache_view=view)

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
            worker.cache_view.clear()  # it may come back restarted, its cache empty
            return
        worker.stats = stats_from_pb(pb, self._cache_limits.max_summary_keys)
        worker.is_healthy = worker.stats.is_ready and worker.stats.role == worker.role
        worker.num_blocks_routed_since_stats = 0
        if not worker.cache_view.update(pb.cached_block_keys):
            logger.warning("%s worker %s: cache summary of %d keys ignored (at most %d)", worker.role,
                           worker.address, len(pb.cached_block_keys), self._cache_limits.max_summary_keys)

    async def _refresh_forever(self) -> None:
        while True:
            await self.refresh()
            self.close_drained_workers()
            await asyncio.sleep(self._refresh_seconds)

    def workers_of(self, role: str) -> list[WorkerHandle]:
        if role not in ROLES:
            raise ValueError(f"role: must be one of {ROLES}, got {role!r}")
        return self.prefill_workers if role == "prefill" else self.decode_workers

    def add_worker(self, role: str, address: str) -> WorkerHandle:
        """Routes to the worker at `address` from its first ready GetStats on (polled at once, on a running
        loop); a worker of that address still draining is taken back as it is."""
        workers = self.workers_of(role)
        for worker in workers:
            if worker.address == address:
                return worker
        retired = [w for w in self.retired_workers if w.role == role and w.address == address]
        if retired:
            worker = retired[0]
            self.retired_workers.remove(worker)
            worker.idle_since = None
            logger.info("%s worker %s is back before it drained", role, address)
        else:
            worker = self._connect(address, role)
            logger.info("%s worker %s added", role, address)
        workers.append(worker)
        if _has_running_loop():  # else the first refresh polls it
            self._in_background(self._refresh_one(worker))
        return worker

    def retire_worker(self, role: str, address: str) -> None:
        """Drains the worker at `address`: no new request goes there, requests in flight finish on it; its
        channel closes once none is left (`close_drained_workers`). Unknown addresses are ignored."""
        workers = self.workers_of(role)
        for worker in workers:
            if worker.address == address:
                workers.remove(worker)
                self.retired_workers.append(worker)
                logger.info("%s worker %s removed: draining %d requests in flight", role, address,
                            worker.num_inflight_requests)
                return

    def close_drained_workers(self) -> None:
        """Closes each retired worker that has had no request in flight for the close grace."""
        now = self._clock()
        for worker in list(self.retired_workers):
            if worker.num_inflight_requests > 0:
                worker.idle_since = None
                continue
            if worker.idle_since is None:
                worker.idle_since = now
            if now - worker.idle_since < _RETIRED_CLOSE_GRACE_SECONDS:
                continue
            self.retired_workers.remove(worker)
            for callback in self.on_worker_closed:
                callback(worker)
            self._in_background(worker.channel.close(grace=_RETIRED_CLOSE_GRACE_SECONDS))
            logger.info("%s worker %s drained and closed", worker.role, worker.address)

    def _in_background(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def start(self) -> None:
        self._refresh_task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def close(self) -> None:
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh_task
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for worker in [*self.workers, *self.retired_workers]:
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

    def pick_prefill(self, prompt_token_ids: Sequence[int] = ()) -> WorkerHandle:
        return self.commit(self._choose("prefill", self.prefill_workers, prompt_token_ids))

    def pick_decode(self, prompt_token_ids: Sequence[int] = ()) -> WorkerHandle:
        """`prompt_token_ids`: the prompt the decode worker is handed (its KV is what it would pull)."""
        return self.commit(self.choose_decode(prompt_token_ids))

    def choose_decode(self, prompt_token_ids: Sequence[int] = ()) -> "RouteChoice":
        """The decode worker `pick_decode` would take, with nothing recorded yet (no load counted, no
        cache prediction, no metric): `commit` it once the request really goes there."""
        return self._choose("decode", self.decode_workers, prompt_token_ids)

    def commit(self, choice: "RouteChoice") -> WorkerHandle:
        """Records a choice as made: the blocks it adds to the worker's load, what the worker will cache,
        the decision's metrics (on the current `route` span too); returns its worker."""
        worker, num_prompt_tokens = choice.worker, len(choice.prompt.token_ids)
        if choice.role == "decode":
            worker.num_blocks_routed_since_stats += num_blocks_for(num_prompt_tokens, worker.block_size)
        if choice.is_cache_aware:
            if worker.cache_view.has_published_keys:
                worker.cache_view.predict(choice.prompt.for_block_size(worker.block_size))
            self._record(choice.role, num_prompt_tokens,
                         _cached_tokens(num_prompt_tokens, choice.num_cached_blocks, worker.block_size))
        return worker

    def _choose(self, role: str, workers: list[WorkerHandle], prompt_token_ids: Sequence[int]) -> "RouteChoice":
        healthy = [w for w in workers if w.is_healthy]
        if not healthy:
            raise Unavailable(f"no {role} worker is ready ({', '.join(w.address for w in workers) or 'none known'})")
        is_cache_aware = self.routing.mode is RouterMode.KV and len(prompt_token_ids) > 0
        prompt = PromptKeys(prompt_token_ids)
        cached_blocks = [w.cache_view.num_cached_blocks(prompt.for_block_size(w.block_size)) if is_cache_aware
                         else 0 for w in healthy]
        candidate = _prefill_candidate if role == "prefill" else _decode_candidate
        candidates = [candidate(w, len(prompt_token_ids), n) for w, n in zip(healthy, cached_blocks)]
        index = choose(candidates, self.routing, next(self._turns[role]), self._rng)
        return RouteChoice(role, healthy[index], prompt, cached_blocks[index], is_cache_aware)

    def _record(self, role: str, num_prompt_tokens: int, num_cached_tokens: int) -> None:
        """A cache-aware decision: on the current (`route`) span and in the metrics."""
        trace.get_current_span().set_attribute(ROUTE_CACHED_TOKENS, num_cached_tokens)
        if self._metrics is not None:
            self._metrics.observe_decision(role, num_prompt_tokens, num_cached_tokens)

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


def _has_running_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _cached_tokens(num_prompt_tokens: int, num_cached_blocks: int, block_size: int) -> int:
    """Prompt tokens a worker holding `num_cached_blocks` leading blocks would not compute (the engine
    always computes at least the last one)."""
    return max(0, min(num_cached_blocks * block_size, num_prompt_tokens - 1))


def _prefill_candidate(worker: WorkerHandle, num_prompt_tokens: int, num_cached_blocks: int) -> Candidate:
    reported = max(0, worker.stats.num_queued_prompt_tokens) if worker.stats else 0
    return Candidate(
        num_uncached=num_prompt_tokens - _cached_tokens(num_prompt_tokens, num_cached_blocks, worker.block_size),
        num_pending=worker.num_inflight_prompt_tokens + reported,
        load_key=worker.prefill_score(),
    )


def _decode_candidate(worker: WorkerHandle, num_prompt_tokens: int, num_cached_blocks: int) -> Candidate:
    num_used_blocks = worker.stats.num_used_blocks if worker.stats else 0
    return Candidate(
        num_uncached=max(0, num_blocks_for(num_prompt_tokens, worker.block_size) - num_cached_blocks),
        num_pending=max(0, num_used_blocks) + worker.num_blocks_routed_since_stats,
        load_key=worker.decode_score(),
    )
