"""Runs an engine on a thread of its own; asyncio handlers reach it only through a command queue.

    grpc.aio handler --call(fn)--> commands (queue.Queue) --> engine thread: fn(); poll(); step()
    grpc.aio handler <--one call_soon_threadsafe per iteration-- mailbox <-- on_outputs, commands, poll

One loop iteration: run every queued command, let the service poll its non-blocking work (KV
transfers, lease expiry), then one `engine.step()` if the engine has work, then flush the mailbox:
everything the iteration produced for the asyncio side (a whole step's tokens for every request)
crosses threads in one `call_soon_threadsafe`. Handing results back never blocks the engine thread,
so a slow client can never stall a step.

If anything escapes the loop (a bug outside one request's handling), the thread dies: queued and later
commands fail with `Unavailable`, and `on_death(error)` lets the service end its streams and report
itself dead (health NOT_SERVING, process exit).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from services.common.errors import Unavailable

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long the idle engine thread sleeps waiting for a command; shorter while transfers are pending.
_IDLE_WAIT_SECONDS = 0.05
_BUSY_POLL_WAIT_SECONDS = 0.0005


class Mailbox:
    """Engine thread -> asyncio loops: callbacks collected over one engine-loop iteration, then handed to
    each loop in a single `call_soon_threadsafe` (one per loop, not one per request and token).

    `post` may be called from any thread; `flush` only from the engine thread. Callbacks run on their
    loop in post order.
    """

    def __init__(self) -> None:
        self._pending: collections.deque[tuple[asyncio.AbstractEventLoop, Callable[[Any], None], Any]] = (
            collections.deque())

    def post(self, loop: asyncio.AbstractEventLoop, callback: Callable[[Any], None], argument: Any) -> None:
        """`callback(argument)` will run on `loop` after the next flush."""
        self._pending.append((loop, callback, argument))

    def flush(self) -> None:
        num_pending = len(self._pending)
        if num_pending == 0:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Callable[[Any], None], Any]]] = {}
        popleft = self._pending.popleft  # popleft, not a swap: a concurrent post is never lost
        for _ in range(num_pending):
            loop, callback, argument = popleft()
            calls = by_loop.get(loop)
            if calls is None:
                calls = by_loop[loop] = []
            calls.append((callback, argument))
        for loop, calls in by_loop.items():
            try:
                loop.call_soon_threadsafe(_run_calls, calls)
            except RuntimeError:  # event loop closed: the server is shutting down, nobody waits
                pass


def _run_calls(calls: list[tuple[Callable[[Any], None], Any]]) -> None:
    for callback, argument in calls:
        try:
            callback(argument)
        except Exception:  # noqa: BLE001 - one bad callback must not starve the others
            logger.exception("mailbox callback failed")


class EngineThread:
    def __init__(
        self,
        engine: Any,
        on_outputs: Callable[[list], None],
        poll: Callable[[], bool] | None = None,
        on_step_error: Callable[[BaseException], None] | None = None,
        on_death: Callable[[BaseException], None] | None = None,
        name: str = "engine",
    ):
        """`poll()` runs every iteration and returns True while it has pending non-blocking work.

        `on_step_error(error)`: a step raised; the thread goes on. `on_death(error)`: something escaped
        the loop (poll, on_outputs, on_step_error); it runs on the dying thread, before its last flush.
        """
        self.engine = engine
        self.mailbox = Mailbox()
        self._on_outputs = on_outputs
        self._poll = poll or (lambda: False)
        self._on_step_error = on_step_error
        self._on_death = on_death
        self._commands: queue.Queue = queue.Queue()
        self._is_stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.death: BaseException | None = None  # what killed the thread, if it died
        self.num_steps = 0
        self.step_started_ns = self.step_ended_ns = 0  # time.time_ns() around the latest step (for spans)

    @property
    def is_alive(self) -> bool:
        """False once the thread died (a stopped thread that was never started also counts as alive)."""
        return self.death is None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_seconds: float = 10.0) -> None:
        self._is_stopped.set()
        self._commands.put(None)  # wake the loop
        self._thread.join(timeout_seconds)

    def call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Runs `fn()` on the engine thread between steps; the future holds its result or exception."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        if self._is_stopped.is_set():
            future.set_exception(self._stopped_error())
            return future
        self._commands.put((fn, future))
        return future

    async def run(self, fn: Callable[[], T]) -> T:
        """`call` for asyncio code."""
        return await asyncio.wrap_future(self.call(fn))

    def _stopped_error(self) -> Unavailable:
        if self.death is not None:
            return Unavailable(f"engine thread died: {type(self.death).__name__}: {self.death}")
        return Unavailable("engine thread is stopped")

    def _run_commands(self, wait_seconds: float) -> None:
        try:
            command = self._commands.get(timeout=wait_seconds) if wait_seconds > 0 else self._commands.get_nowait()
        except queue.Empty:
            return
        while command is not None:
            fn, future = command
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as exc:  # noqa: BLE001 - handed to the caller
                    future.set_exception(exc)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - a dead engine thread must be loud and visible
            self._die(exc)
        finally:
            self._fail_queued_commands()

    def _loop(self) -> None:
        wait_seconds = 0.0
        while not self._is_stopped.is_set():
            self._run_commands(wait_seconds)
            if self._is_stopped.is_set():
                break
            is_polling = self._poll()
            has_work = self.engine.has_unfinished_requests()
            if has_work:
                self._step()
            self.mailbox.flush()
            wait_seconds = 0.0 if has_work else (_BUSY_POLL_WAIT_SECONDS if is_polling else _IDLE_WAIT_SECONDS)
        self.mailbox.flush()

    def _step(self) -> None:
        self.step_started_ns = time.time_ns()
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 - a bug in a step must not kill the worker silently
            logger.exception("engine step failed")
            if self._on_step_error is None:
                raise
            self._on_step_error(exc)
            return
        self.num_steps += 1
        self.step_ended_ns = time.time_ns()
        if outputs:
            self._on_outputs(outputs)

    def _die(self, error: BaseException) -> None:
        logger.critical("engine thread %s died", self._thread.name, exc_info=error)
        self.death = error
        self._is_stopped.set()
        if self._on_death is not None:
            try:
                self._on_death(error)
            except BaseException:  # noqa: BLE001 - nothing more can be done on this thread
                logger.exception("on_death of engine thread %s failed", self._thread.name)
        self.mailbox.flush()

    def _fail_queued_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command is not None:
                command[1].set_exception(self._stopped_error())


class AsyncSink:
    """Items from the engine thread to one asyncio consumer, which may take everything queued at once.

    The engine thread `put`s through the engine's mailbox (delivered at the end of its loop iteration);
    the consumer awaits `get_all()` and gets every item that arrived since its last call, in order.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, mailbox: Mailbox):
        self._loop = loop
        self._mailbox = mailbox
        self._items: collections.deque = collections.deque()
        self._waiter: asyncio.Future | None = None

    def put(self, item: Any) -> None:
        """Thread-safe; never blocks. Items for a consumer whose loop has closed are dropped."""
        self._mailbox.post(self._loop, self._push, item)

    def _push(self, item: Any) -> None:  # on the loop
        self._items.append(item)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def get_all(self) -> list:
        """Waits for at least one item; returns every queued item, oldest first."""
        while not self._items:
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self._items)
        self._items.clear()
        return items
