"""Runs an engine on a thread of its own; asyncio handlers reach it only through a command queue.

    grpc.aio handler --call(fn)--> commands (queue.Queue) --> engine thread: fn(); poll(); step()
    grpc.aio handler <--loop.call_soon_threadsafe-- outputs sink <-- on_outputs(step outputs)

One loop iteration: run every queued command, let the service poll its non-blocking work (KV
transfers, lease expiry), then one `engine.step()` if the engine has work. Handing results back
never blocks the engine thread, so a slow client can never stall a step.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long the idle engine thread sleeps waiting for a command; shorter while transfers are pending.
_IDLE_WAIT_SECONDS = 0.05
_BUSY_POLL_WAIT_SECONDS = 0.0005


class EngineThread:
    def __init__(
        self,
        engine: Any,
        on_outputs: Callable[[list], None],
        poll: Callable[[], bool] | None = None,
        on_step_error: Callable[[BaseException], None] | None = None,
        name: str = "engine",
    ):
        """`poll()` runs every iteration and returns True while it has pending non-blocking work."""
        self.engine = engine
        self._on_outputs = on_outputs
        self._poll = poll or (lambda: False)
        self._on_step_error = on_step_error
        self._commands: queue.Queue = queue.Queue()
        self._is_stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.num_steps = 0
        self.step_started_ns = self.step_ended_ns = 0  # time.time_ns() around the latest step (for spans)

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
            future.set_exception(RuntimeError("engine thread is stopped"))
            return future
        self._commands.put((fn, future))
        return future

    async def run(self, fn: Callable[[], T]) -> T:
        """`call` for asyncio code."""
        return await asyncio.wrap_future(self.call(fn))

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
        wait_seconds = 0.0
        while not self._is_stopped.is_set():
            self._run_commands(wait_seconds)
            if self._is_stopped.is_set():
                break
            is_polling = self._poll()
            has_work = self.engine.has_unfinished_requests()
            if has_work:
                self._step()
            wait_seconds = 0.0 if has_work else (_BUSY_POLL_WAIT_SECONDS if is_polling else _IDLE_WAIT_SECONDS)
        self._fail_queued_commands()

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

    def _fail_queued_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command is not None:
                command[1].set_exception(RuntimeError("engine thread is stopped"))


class AsyncSink:
    """Delivers items from the engine thread to one asyncio consumer without blocking the producer."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        """Thread-safe; never blocks. Items for a consumer whose loop has closed are dropped."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # event loop closed: the server is shutting down
            pass

    async def get(self) -> Any:
        return await self._queue.get()
