"""Runs one `FrontendApp.generate` per choice, each as its own task, and merges their outputs.

    choice 0 ─ task ─ app.generate ─┐
    choice 1 ─ task ─ app.generate ─┼─► queue ─► batches of (index, Chunk | Finish) in arrival order
    ...                             ┘

A batch is everything queued when the consumer looks, so a consumer that falls behind (a slow HTTP
client, a busy loop) takes many outputs at once and writes them as one.

Each choice needs a task of its own: `app.generate` registers the task it runs in, and cancelling that
task is what aborts the request on the workers. `close()` (also run when the consumer stops early, e.g.
a client disconnect) cancels every choice still running; it never awaits, so it is safe inside a
cancelled scope. The first error of any choice is raised to the consumer and stops the others.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from protos import generation_pb2
from services.frontend.admission import Slot
from services.frontend.app import FrontendApp
from services.frontend.convert import Chunk, Finish
from services.frontend.openai.convert import ChoiceRequest


def _no_deadline() -> None:
    return None


class ChoiceFailed(Exception):
    """Choice `index` failed with `error` (the index tells which prompt a field error is about)."""

    def __init__(self, index: int, error: BaseException):
        super().__init__(f"choice {index}: {error}")
        self.index = index
        self.error = error


class FanOut:
    def __init__(self, app: FrontendApp, choices: list[ChoiceRequest], slots: list[Slot] | None = None):
        """`slots`: the admission slots taken for the choices, one each (given back as each ends)."""
        self._app = app
        self._choices = choices
        self._slots = slots
        # (choice index, output | None when the choice ended, exception | None)
        self._queue: asyncio.Queue[tuple[int, Chunk | Finish | None, BaseException | None]] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(c.index, c.request, self._slot(i)))
                       for i, c in enumerate(self._choices)]
        for task, slot in zip(self._tasks, self._slots or ()):
            task.add_done_callback(lambda _, slot=slot: slot.release())  # also when cancelled before it ran

    def _slot(self, position: int) -> Slot | None:
        return self._slots[position] if self._slots is not None else None

    async def _run(self, index: int, request: generation_pb2.GenerateRequest, slot: Slot | None) -> None:
        try:
            items = self._app.generate(request, _no_deadline) if slot is None else self._app.generate(
                request, _no_deadline, slot=slot)
            async for item in items:
                self._queue.put_nowait((index, item, None))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, which maps it to an HTTP error
            self._queue.put_nowait((index, None, exc))
        else:
            self._queue.put_nowait((index, None, None))

    async def batches(self) -> AsyncIterator[list[tuple[int, Chunk | Finish]]]:
        """Yields what queued since the last batch, as (choice index, output), until every choice ended;
        raises the first choice error (after the outputs queued before it)."""
        if not self._tasks:
            self.start()
        num_running = len(self._tasks)
        try:
            while num_running:
                entries = [await self._queue.get()]
                while not self._queue.empty():
                    entries.append(self._queue.get_nowait())
                batch = []
                for index, item, error in entries:
                    if error is not None:
                        if batch:
                            yield batch
                        raise ChoiceFailed(index, error)
                    if item is None:
                        num_running -= 1
                    else:
                        batch.append((index, item))
                if batch:
                    yield batch
        finally:
            self.close()

    def close(self) -> None:
        """Cancels every choice still running (each aborts its request on the workers)."""
        for task in self._tasks:
            if not task.done():
                task.cancel()
        if not self._tasks:  # never started: nothing else gives the slots back
            for slot in self._slots or ():
                slot.release()
