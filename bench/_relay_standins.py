"""Stand-in workers for bench/frontend_relay.py: gRPC servers that answer the frontend as fast as they can.

    python bench/_relay_standins.py prefill|decode SETUP.json READY.json STATS.json

Prefill returns token #1 and a KV handle at once. A decode stand-in steps every `step_ms`: each step makes
one token for every open request, which leaves the way the decode worker sends it, on both of its RPCs:
`Decode` (a call per request; what queued while the call's writer was behind goes out as one TokenBatch)
and `DecodeStream` (a call per frontend; one message per step with each request's token in the message's
token columns and finals as updates, the steps that queued while its writer was behind in one message). Output tokens continue the benchmark text from a
character boundary, so the frontend detokenizes real text, multi-byte characters split across tokens
included. Each stand-in writes its counters (messages, tokens, CPU seconds) to STATS.json 4 times a second.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO_ROOT / "bench":
    sys.path[0] = str(REPO_ROOT)  # run as a script: import the repository's packages, not bench/*

import grpc  # noqa: E402
import psutil  # noqa: E402

from protos import kv_layout_pb2, worker_pb2, worker_pb2_grpc  # noqa: E402

TEXT = (
    "The old lighthouse keeper climbed the spiral stairs every evening, counting the steps as his father "
    "had: one hundred and twelve. From the lamp room he could see the whole bay, the fishing boats "
    "coming home and the café lights along the harbour — naïve tourists called it the end of the world. "
    "He wrote the weather in a notebook: 東京は晴れ, 北風 (his daughter taught him), 12°C, waves 1½ m. "
    "On good nights he added a drawing: a gull 🐦, a star ⭐, a boat ⛵, or a smiling moon 🌝. "
    "Nobody read the notebook, but he kept it the way one keeps a promise, line by line, year by year. "
)
PROMPT_LENGTH = 20  # characters-starting tokens per prompt
STATS_INTERVAL_SECONDS = 0.25  # how often a stand-in writes its counters



@dataclass
class Script:
    token_ids: list[int]  # TEXT, tokenized
    char_starts: list[int]  # positions whose token starts a character (continuations start there)

    def prompt(self, index: int) -> list[int]:
        """Prompt `index`: about PROMPT_LENGTH tokens of the text, from one character boundary to another."""
        num_starts = len(self.char_starts)
        first = index * 7 % num_starts
        begin, end = self.char_starts[first], self.char_starts[(first + PROMPT_LENGTH) % num_starts]
        end += len(self.token_ids) if end <= begin else 0
        return self.output(begin, 0, end - begin)

    def continuation_start(self, prompt_token_ids) -> int:
        return self.char_starts[sum(prompt_token_ids) % len(self.char_starts)]

    def output(self, start: int, begin: int, end: int) -> list[int]:
        """Output tokens [begin, end) of a stream whose continuation starts at `start`."""
        n = len(self.token_ids)
        return [self.token_ids[(start + i) % n] for i in range(begin, end)]


def make_script(tokenizer) -> Script:
    token_ids = tokenizer.encode(TEXT, add_special_tokens=False)
    # a token that continues a character decodes (with what follows) to a leading U+FFFD
    char_starts = [position for position in range(len(token_ids))
                   if not tokenizer.decode(token_ids[position:position + 4]).startswith("\ufffd")]
    return Script(token_ids, char_starts)


def _stats(role: str, facts: dict, num_running: int) -> worker_pb2.WorkerStats:
    layout = kv_layout_pb2.KVLayout(model_name=facts["model"], dtype="bfloat16", block_size=16, num_layers=30,
                                    num_kv_heads=3, head_dim=64)
    return worker_pb2.WorkerStats(role=role, is_ready=True, num_running=num_running, num_free_blocks=100_000,
                                  num_total_blocks=100_000, max_model_len=facts["max_model_len"],
                                  vocab_size=facts["vocab_size"], eos_token_ids=facts["eos_token_ids"],
                                  layout=layout)


class PrefillStandIn(worker_pb2_grpc.PrefillWorkerServicer):
    def __init__(self, script: Script, facts: dict):
        self.script, self.facts, self.counters = script, facts, {"num_requests": 0}

    async def Prefill(self, request, context):
        self.counters["num_requests"] += 1
        start = self.script.continuation_start(request.prompt_token_ids)
        num_tokens = len(request.prompt_token_ids)
        handle = worker_pb2.KVHandle(transfer_id=os.urandom(16).hex(), sender_address="stand-in:0",
                                     num_tokens=num_tokens, num_blocks=-(-num_tokens // 16),
                                     layout=_stats("prefill", self.facts, 0).layout)
        finished = worker_pb2.FINISH_REASON_LENGTH if request.sampling.max_tokens == 1 else 0
        return worker_pb2.PrefillResponse(request_id=request.request_id, first_token_id=self.script.token_ids[start],
                                          finish_reason=finished, kv_handle=None if finished else handle)

    async def Abort(self, request, context):
        return worker_pb2.AbortResponse(was_running=False)

    async def GetStats(self, request, context):
        return _stats("prefill", self.facts, 0)


class _Stream:
    """One request being decoded: tokens made by steps, how many were sent, who to wake."""

    __slots__ = ("request_id", "start", "num_total", "num_made", "num_sent", "wake")

    def __init__(self, request: worker_pb2.DecodeRequest, script: Script, wake):
        self.request_id = request.request_id
        self.start = script.continuation_start(request.prompt_token_ids)
        self.num_total = request.sampling.max_tokens  # output index 0 is token #1 (sent by prefill)
        self.num_made = self.num_sent = 1
        self.wake = wake  # called after each step that made tokens for this stream


class _StreamSession:
    """One DecodeStream call: many requests, one message per step with every request's updates."""

    def __init__(self):
        self.dirty: dict[str, _Stream] = {}  # streams with tokens made and not sent, by request id
        self.wakeup = asyncio.Event()

    def wake(self, stream: _Stream) -> None:
        self.dirty[stream.request_id] = stream
        self.wakeup.set()


class DecodeStandIn(worker_pb2_grpc.DecodeWorkerServicer):
    """Both ways the decode worker streams: `Decode` (a call per request, what queued while its writer
    was behind merged into one TokenBatch) and `DecodeStream` (a call per frontend, one message per
    step holding one column entry per request per step and a final update per ending request; what
    queued while its writer was behind in one)."""

    def __init__(self, script: Script, facts: dict, step_seconds: float):
        self.script, self.facts, self.step_seconds = script, facts, step_seconds
        self._stepping: set[_Stream] = set()  # streams still being generated
        self._num_open = 0
        self.counters = {"num_requests": 0, "num_messages": 0, "num_tokens": 0, "num_steps": 0}

    async def run_steps(self) -> None:
        """One token per stepping stream per step; a late loop makes the steps it missed at once."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            num_steps = int((loop.time() - started) / self.step_seconds) + 1 - self.counters["num_steps"]
            self.counters["num_steps"] += num_steps
            for stream in list(self._stepping):
                stream.num_made = min(stream.num_total, stream.num_made + num_steps)
                if stream.num_made == stream.num_total:
                    self._stepping.discard(stream)
                stream.wake(stream)
            await asyncio.sleep(max(0.0, started + self.counters["num_steps"] * self.step_seconds - loop.time()))

    def _open(self, request: worker_pb2.DecodeRequest, wake) -> _Stream:
        self.counters["num_requests"] += 1
        self._num_open += 1
        stream = _Stream(request, self.script, wake)
        self._stepping.add(stream)
        return stream

    def _close(self, stream: _Stream) -> None:
        if stream in self._stepping:
            self._stepping.discard(stream)
        self._num_open -= 1

    async def Decode(self, request, context):
        waiter: list[asyncio.Future | None] = [None]

        def wake(_stream: _Stream) -> None:
            if waiter[0] is not None and not waiter[0].done():
                waiter[0].set_result(None)

        stream = self._open(request, wake)
        try:
            while stream.num_sent < stream.num_total:
                if stream.num_made == stream.num_sent:
                    waiter[0] = asyncio.get_running_loop().create_future()
                    await waiter[0]
                token_ids = self.script.output(stream.start, stream.num_sent, stream.num_made)
                stream.num_sent = stream.num_made
                self.counters["num_messages"] += 1
                self.counters["num_tokens"] += len(token_ids)
                yield worker_pb2.DecodeResponse(tokens=worker_pb2.TokenBatch(token_ids=token_ids))
            yield worker_pb2.DecodeResponse(final=_final(stream))
        finally:
            self._close(stream)

    async def DecodeStream(self, request_iterator, context):
        session = _StreamSession()
        streams: dict[str, _Stream] = {}

        async def read_requests() -> None:
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if kind in ("decode", "decodes"):
                    for request in [message.decode] if kind == "decode" else message.decodes.requests:
                        streams[request.request_id] = self._open(request, session.wake)
                elif message.abort.request_id in streams:
                    self._close(streams.pop(message.abort.request_id))
                    session.dirty.pop(message.abort.request_id, None)

        reader = asyncio.get_running_loop().create_task(read_requests())
        try:
            while True:
                await session.wakeup.wait()
                session.wakeup.clear()
                token_request_ids, token_ids, updates = [], [], []  # a request's column tokens before its final
                for stream in session.dirty.values():
                    token_ids += self.script.output(stream.start, stream.num_sent, stream.num_made)
                    token_request_ids += [stream.request_id] * (stream.num_made - stream.num_sent)
                    self.counters["num_tokens"] += stream.num_made - stream.num_sent
                    stream.num_sent = stream.num_made
                    if stream.num_sent == stream.num_total and streams.pop(stream.request_id, None) is not None:
                        updates.append(worker_pb2.DecodeUpdate(request_id=stream.request_id, final=_final(stream)))
                        self._close(stream)
                session.dirty.clear()
                if token_ids or updates:
                    self.counters["num_messages"] += 1
                    yield worker_pb2.DecodeStreamResponse(token_request_ids=token_request_ids, token_ids=token_ids,
                                                          updates=updates)
        finally:
            reader.cancel()
            for stream in streams.values():
                self._close(stream)

    async def Abort(self, request, context):
        return worker_pb2.AbortResponse(was_running=False)

    async def GetStats(self, request, context):
        return _stats("decode", self.facts, self._num_open)


def _final(stream: _Stream) -> worker_pb2.DecodeFinal:
    return worker_pb2.DecodeFinal(finish_reason=worker_pb2.FINISH_REASON_LENGTH, num_generated_tokens=stream.num_total)


async def _write_counters_forever(path: str, counters: dict) -> None:
    process = psutil.Process()
    while True:
        cpu = process.cpu_times()
        write_json(path, {**counters, "cpu_seconds": cpu.user + cpu.system})
        await asyncio.sleep(STATS_INTERVAL_SECONDS)


async def run_standin(role: str, setup_path: str, ready_path: str, stats_path: str) -> None:
    setup = json.loads(Path(setup_path).read_text())
    script, facts = Script(setup["token_ids"], setup["char_starts"]), setup["facts"]
    server = grpc.aio.server()
    tasks = []
    if role == "prefill":
        servicer = PrefillStandIn(script, facts)
        worker_pb2_grpc.add_PrefillWorkerServicer_to_server(servicer, server)
    else:
        servicer = DecodeStandIn(script, facts, setup["step_ms"] / 1000)
        worker_pb2_grpc.add_DecodeWorkerServicer_to_server(servicer, server)
        tasks.append(asyncio.create_task(servicer.run_steps()))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    tasks.append(asyncio.create_task(_write_counters_forever(stats_path, servicer.counters)))
    write_json(ready_path, {"port": port})
    await server.wait_for_termination()


def write_json(path: str | Path, payload: dict) -> None:
    tmp_path = f"{path}.tmp"
    Path(tmp_path).write_text(json.dumps(payload))
    os.replace(tmp_path, path)


if __name__ == "__main__":
    asyncio.run(run_standin(*sys.argv[1:5]))
