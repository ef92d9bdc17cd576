"""The engine thread hands a whole iteration's results to asyncio in one call_soon_threadsafe, and a
thread that dies says so: its commands fail UNAVAILABLE and `on_death` runs."""

import asyncio
import threading
import time

import pytest

from services.common.engine_thread import AsyncSink, EngineThread, Mailbox
from services.common.errors import Unavailable


class _StepEngine:
    """Each step gives one output per request id until `num_steps` steps have run."""

    def __init__(self, request_ids: list[str], num_steps: int):
        self.request_ids, self.num_steps_left = request_ids, num_steps

    def has_unfinished_requests(self) -> bool:
        return self.num_steps_left > 0

    def step(self) -> list[tuple[str, int]]:
        self.num_steps_left -= 1
        return [(request_id, self.num_steps_left) for request_id in self.request_ids]


def _count_threadsafe_calls(loop: asyncio.AbstractEventLoop) -> list[int]:
    counter = [0]
    original = loop.call_soon_threadsafe

    def counting(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    loop.call_soon_threadsafe = counting
    return counter


def test_a_step_for_many_requests_crosses_threads_once():
    num_requests, num_steps = 64, 5

    async def run():
        loop = asyncio.get_running_loop()
        sinks: dict[str, AsyncSink] = {}
        engine = _StepEngine([f"r{i}" for i in range(num_requests)], num_steps)
        thread = EngineThread(engine, lambda outputs: [sinks[rid].put(left) for rid, left in outputs])
        sinks.update({rid: AsyncSink(loop, thread.mailbox) for rid in engine.request_ids})
        calls = _count_threadsafe_calls(loop)
        thread.start()
        received = {rid: [] for rid in sinks}
        while any(len(items) < num_steps for items in received.values()):
            for rid, sink in sinks.items():
                if len(received[rid]) < num_steps:
                    received[rid] += await asyncio.wait_for(sink.get_all(), 5)
        thread.stop()
        return calls[0], received

    num_calls, received = asyncio.run(run())
    assert all(items == list(range(num_steps - 1, -1, -1)) for items in received.values())  # in order
    assert num_calls == num_steps  # one hand-over per step, not one per request


def test_a_sink_gives_everything_queued_in_order_and_mailboxes_serve_several_loops():
    mailbox = Mailbox()

    async def consume(ready: threading.Event, got: list):
        sink = AsyncSink(asyncio.get_running_loop(), mailbox)
        got.append(sink)
        ready.set()
        got.append(await asyncio.wait_for(sink.get_all(), 5))

    results = [[], []]
    readies = [threading.Event(), threading.Event()]
    threads = [threading.Thread(target=lambda i=i: asyncio.run(consume(readies[i], results[i]))) for i in range(2)]
    for thread in threads:
        thread.start()
    for ready in readies:
        assert ready.wait(5)
    for value in range(3):
        results[0][0].put(("a", value))
        results[1][0].put(("b", value))
    mailbox.flush()
    for thread in threads:
        thread.join(5)
    assert results[0][1] == [("a", 0), ("a", 1), ("a", 2)]
    assert results[1][1] == [("b", 0), ("b", 1), ("b", 2)]


def test_a_dead_engine_thread_fails_its_commands_and_reports_its_death():
    deaths = []

    class Engine:
        def has_unfinished_requests(self):
            return False

    def poll():
        raise RuntimeError("bug in poll")

    thread = EngineThread(Engine(), lambda outputs: None, poll=poll, on_death=deaths.append)
    thread.start()
    deadline = time.monotonic() + 5
    while thread.is_alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not thread.is_alive and isinstance(thread.death, RuntimeError)
    assert [str(error) for error in deaths] == ["bug in poll"]
    with pytest.raises(Unavailable, match="engine thread died: RuntimeError: bug in poll"):
        thread.call(lambda: 1).result(5)
    thread.stop()


def test_a_failing_step_is_survived_through_on_step_error():
    errors = []

    class Engine:
        num_steps = 0

        def has_unfinished_requests(self):
            return self.num_steps < 3

        def step(self):
            self.num_steps += 1
            if self.num_steps == 1:
                raise RuntimeError("bad step")
            return []

    engine = Engine()
    thread = EngineThread(engine, lambda outputs: None, on_step_error=errors.append)
    thread.start()
    assert thread.call(lambda: engine.num_steps).result(5) >= 0
    deadline = time.monotonic() + 5
    while engine.num_steps < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert thread.is_alive and engine.num_steps == 3 and [str(e) for e in errors] == ["bad step"]
    thread.stop()
