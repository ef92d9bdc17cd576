"""The bench's client: streamed requests over gRPC and the OpenAI HTTP API with per-request timings,
sent from several client processes so that the client itself is not what limits a run.

    parent (ClientPool.run)                               client process k of N (spawn, its own event loop)
      requests k, k+N, k+2N, ... and their arrivals  ──►  opens its channel, answers "ready"
      all ready: start_at = now + START_LEAD_SECONDS ──►  sends each request at start_at + its arrival
                                                     ◄──  its records, last end (or the cut), CPU seconds
      records back in request order; wall = the latest end (or cut) - start_at

Every time is `time.monotonic()`: CLOCK_MONOTONIC on Linux, one clock for all processes of the machine,
so times taken in different client processes compare and merge directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import signal
import time
import traceback
from dataclasses import dataclass, field

import grpc

from bench._common import HttpError, poisson_arrivals, post_sse
from bench._disagg_services import die_with_parent
from protos import generation_pb2, generation_pb2_grpc

START_LEAD_SECONDS = 0.1  # from "all ready" to the shared start: time for the start message to arrive
CONNECT_TIMEOUT_SECONDS = 30.0  # a client process's gRPC channel to the frontend
REPLY_GRACE_SECONDS = 60.0  # past a run's time limit, how long the parent waits for a client's records
# post_sse stamps events with time.perf_counter(); adding this puts them on time.monotonic() (on Linux
# both read CLOCK_MONOTONIC, so it is about 0).
PERF_COUNTER_TO_MONOTONIC = time.monotonic() - time.perf_counter()


@dataclass
class Target:
    """Where the clients send: the frontend's gRPC address and HTTP port, the served model's name."""

    grpc_address: str
    http_port: int
    model_name: str


@dataclass
class RequestRecord:
    request_id: str  # ours; HTTP: the server's (response id + "-0"), known once the stream starts
    num_prompt_tokens: int
    max_tokens: int
    sent: float | None = None  # time.monotonic(); None until it is sent
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk carrying tokens
    num_chunk_tokens: list[int] = field(default_factory=list)  # tokens in each of those chunks
    end: float | None = None
    num_usage_tokens: int | None = None  # completion tokens the server reported at the end
    error: str | None = None

    def add_chunk(self, now: float, num_tokens: int) -> None:
        self.chunk_times.append(now)
        self.num_chunk_tokens.append(num_tokens)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_chunk_tokens)

    @property
    def is_complete(self) -> bool:
        return self.error is None and self.end is not None and self.num_tokens == self.max_tokens

    def second_token_seconds(self) -> float | None:
        """Sent -> the chunk that brought the total to 2 tokens (TTFT + the hand-off + a decode step)."""
        total = 0
        for now, num_tokens in zip(self.chunk_times, self.num_chunk_tokens):
            total += num_tokens
            if total >= 2:
                return now - self.sent
        return None

    def summary(self, start_at: float) -> dict:
        """Its figures; sent_s: seconds from the run's shared start `start_at` to the send."""
        ttft = self.chunk_times[0] - self.sent if self.chunk_times else None
        return {"request_id": self.request_id, "prompt_tokens": self.num_prompt_tokens,
                "max_tokens": self.max_tokens, "num_tokens": self.num_tokens, "usage_tokens": self.num_usage_tokens,
                "num_chunks": len(self.chunk_times), "ttft_s": ttft, "second_token_s": self.second_token_seconds(),
                "e2e_s": None if self.end is None else self.end - self.sent, "error": self.error,
                "sent_s": None if self.sent is None else self.sent - start_at}


# ---- one stream -------------------------------------------------------------------------------------


async def send_grpc(stub, record: RequestRecord, prompt: list[int],
                    received_token_ids: list[int] | None = None) -> None:
    """`received_token_ids`: where the streamed token ids go (a chat's next turn carries them)."""
    request = generation_pb2.GenerateRequest(
        request_id=record.request_id, token_ids=generation_pb2.TokenIds(ids=prompt),
        sampling=generation_pb2.SamplingParams(max_tokens=record.max_tokens, temperature=0.0, ignore_eos=True))
    record.sent = time.monotonic()
    try:
        async for response in stub.Generate(request, timeout=3600):
            if response.HasField("chunk"):
                if response.chunk.token_ids:
                    record.add_chunk(time.monotonic(), len(response.chunk.token_ids))
                    if received_token_ids is not None:
                        received_token_ids.extend(response.chunk.token_ids)
            elif response.HasField("final"):
                record.num_usage_tokens = response.final.usage.completion_tokens
    except grpc.aio.AioRpcError as exc:
        record.error = f"{exc.code().name}: {exc.details()}"
    record.end = time.monotonic()
    _check_length(record)


async def send_http(host: str, port: int, model_name: str, record: RequestRecord, prompt: list[int]) -> None:
    """Streamed /v1/completions; every chunk carries the usage so far (vLLM's continuous_usage_stats),
    which counts the tokens of each chunk exactly, text or not."""
    body = {"model": model_name, "prompt": prompt, "max_tokens": record.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    record.sent = time.monotonic()
    seen = 0
    try:
        async for now, event in post_sse(host, port, "/v1/completions", body):
            if "error" in event:
                record.error = f"in-band error: {event['error'].get('message', event['error'])}"
                break
            record.request_id = f"{event.get('id')}-0"
            usage = event.get("usage") or {}
            total = usage.get("completion_tokens", seen)
            if total > seen:
                record.add_chunk(now + PERF_COUNTER_TO_MONOTONIC, total - seen)
                seen = total
            if event.get("choices") == [] and usage:  # the last chunk: usage only
                record.num_usage_tokens = total
    except (HttpError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    record.end = time.monotonic()
    _check_length(record)


def _check_length(record: RequestRecord) -> None:
    if record.error is None and record.num_tokens != record.max_tokens:
        record.error = (f"{record.num_tokens} tokens streamed, {record.max_tokens} asked "
                        f"(usage {record.num_usage_tokens})")


async def run_load(send, records: list[RequestRecord], prompts: list[list[int]], offsets: list[float],
                   start_at: float, time_limit: float) -> float:
    """Sends each request at start_at + its offset; returns when the last stream ended (or was cut)."""
    async def at_arrival(offset: float, record: RequestRecord, prompt: list[int]) -> None:
        await asyncio.sleep(max(0.0, start_at + offset - time.monotonic()))
        await send(record, prompt)

    if not records:
        return start_at
    tasks = [asyncio.create_task(at_arrival(*item)) for item in zip(offsets, records, prompts)]
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, start_at + time_limit - time.monotonic()))
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for record in records:
        if record.end is None:
            record.error = record.error or f"cut at the {time_limit:.0f} s time limit"
    ends = [r.end for r in records if r.end is not None]
    return max(ends) if ends and not pending else time.monotonic()


# ---- one client process ---------------------------------------------------------------------------


@dataclass
class ClientJob:
    """One client process's share of a run."""

    api: str  # grpc | http
    target: Target
    records: list[RequestRecord]  # this process's requests, in the run's order
    prompts: list[list[int]]  # their token ids
    offsets: list[float]  # seconds after the shared start at which each is sent
    time_limit: float  # seconds after the shared start; requests still streaming then are cut


@dataclass
class ClientResult:
    """What one client process sends back: its records filled in, and what it cost."""

    records: list[RequestRecord]
    ended_at: float  # time.monotonic() of its last stream's end, or of the cut
    cpu_seconds: float  # this process's CPU time (all its threads) from the start to its end
    event_loop: str  # uvloop | asyncio


def _event_loop_factory():
    """(loop factory for asyncio.Runner, its name): uvloop where installed, else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None, "asyncio"
    return uvloop.new_event_loop, "uvloop"


@contextlib.asynccontextmanager
async def _sender(job: ClientJob):
    """`send(record, prompt)` for the job's API; the gRPC channel is connected before it is yielded."""
    target = job.target
    if job.api == "http":
        yield lambda record, prompt: send_http("127.0.0.1", target.http_port, target.model_name, record, prompt)
        return
    options = [("grpc.max_receive_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target.grpc_address, options=options) as channel:
        await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_SECONDS)
        stub = generation_pb2_grpc.GenerationStub(channel)
        yield lambda record, prompt: send_grpc(stub, record, prompt)


async def _run_job(connection, job: ClientJob, event_loop: str) -> ClientResult:
    async with _sender(job) as send:
        connection.send(("ready", None))
        start_at = connection.recv()  # blocks this loop, which has nothing else to run yet
        cpu_before = time.process_time()
        ended_at = await run_load(send, job.records, job.prompts, job.offsets, start_at, job.time_limit)
        cpu_seconds = time.process_time() - cpu_before
    return ClientResult(job.records, ended_at, cpu_seconds, event_loop)


def client_process_main(connection) -> None:
    """A client process: runs each ClientJob it is sent, until None or the parent's end of the pipe closes."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    loop_factory, event_loop = _event_loop_factory()
    while True:
        try:
            job = connection.recv()
        except EOFError:
            return
        if job is None:
            return
        try:
            # a ClientJob, or any job that runs itself (`run_in_process`, e.g. bench/_chat_workload.py's)
            run = (job.run_in_process(connection, event_loop) if hasattr(job, "run_in_process")
                   else _run_job(connection, job, event_loop))
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                connection.send(("done", runner.run(run)))
        except Exception:  # noqa: BLE001 - the parent reports it and stops the run
            connection.send(("error", traceback.format_exc()))


# ---- the processes together -------------------------------------------------------------------------


@dataclass
class ClientRun:
    """A run as all client processes saw it, merged."""

    records: list[RequestRecord]  # in the order they were given to ClientPool.run
    start_at: float  # time.monotonic() of the shared start, arrival offset 0
    wall_seconds: float  # start_at -> the last stream's end (or the cut)
    cpu_fractions: list[float]  # per client process that sent requests: its CPU seconds / wall_seconds
    event_loop: str  # uvloop | asyncio


class ClientError(RuntimeError):
    """A client process failed or stopped answering; the message carries its traceback or exit code."""


class ClientPool:
    """`num_processes` client processes, spawned once and reused by every run."""

    def __init__(self, num_processes: int):
        if num_processes < 1:
            raise ValueError(f"num_processes must be >= 1, got {num_processes}")
        context = multiprocessing.get_context("spawn")
        self._connections = []
        self._processes = []
        for index in range(num_processes):
            parent_end, child_end = context.Pipe()
            process = context.Process(target=client_process_main, args=(child_end,), name=f"bench-client-{index}",
                                      daemon=True)
            process.start()
            child_end.close()
            self._connections.append(parent_end)
            self._processes.append(process)

    @property
    def num_processes(self) -> int:
        return len(self._processes)

    def run(self, api: str, target: Target, records: list[RequestRecord], prompts: list[list[int]], rate: float,
            seed: int, time_limit: float, offsets: list[float] | None = None) -> ClientRun:
        """Sends `records` at Poisson arrivals of `rate` (seeded; inf = all at once), or at `offsets`
        (seconds after the start, one per record) when given, split round-robin across the processes;
        every process starts the same arrival schedule at the same instant."""
        if offsets is None:
            offsets = poisson_arrivals(len(records), rate, seed)
        elif len(offsets) != len(records):
            raise ValueError(f"offsets: one per record, got {len(offsets)} for {len(records)}")
        num_active = max(1, min(self.num_processes, len(records)))
        active = self._connections[:num_active]
        for index, connection in enumerate(active):
            shares = (records[index::num_active], prompts[index::num_active], offsets[index::num_active])
            connection.send(ClientJob(api, target, *shares, time_limit))
        for index in range(num_active):
            self._receive(index, "ready", CONNECT_TIMEOUT_SECONDS + 30)
        start_at = time.monotonic() + START_LEAD_SECONDS
        for connection in active:
            connection.send(start_at)
        results = [self._receive(index, "done", start_at + time_limit + REPLY_GRACE_SECONDS - time.monotonic())
                   for index in range(num_active)]
        merged = list(records)
        for index, result in enumerate(results):
            merged[index::num_active] = result.records
        wall = max(result.ended_at for result in results) - start_at
        return ClientRun(merged, start_at, wall, [r.cpu_seconds / wall if wall > 0 else 0.0 for r in results],
                         results[0].event_loop)

    def run_jobs(self, jobs: list, time_limit: float) -> tuple[float, list]:
        """Jobs that run themselves, one per process (at most `num_processes`): each job's
        `run_in_process(connection, event_loop)` coroutine sends ("ready", None) once connected, receives
        the shared start (time.monotonic()) and returns its result. Returns (start_at, results)."""
        if not 1 <= len(jobs) <= self.num_processes:
            raise ValueError(f"1 to {self.num_processes} jobs, got {len(jobs)}")
        active = self._connections[:len(jobs)]
        for connection, job in zip(active, jobs):
            connection.send(job)
        for index in range(len(jobs)):
            self._receive(index, "ready", CONNECT_TIMEOUT_SECONDS + 30)
        start_at = time.monotonic() + START_LEAD_SECONDS
        for connection in active:
            connection.send(start_at)
        return start_at, [self._receive(index, "done", start_at + time_limit + REPLY_GRACE_SECONDS - time.monotonic())
                          for index in range(len(jobs))]

    def _receive(self, index: int, expected: str, timeout: float):
        connection, process = self._connections[index], self._processes[index]
        try:
            if not connection.poll(max(0.0, timeout)):
                raise ClientError(f"client process {index}: no {expected!r} after {timeout:.0f} s")
            kind, payload = connection.recv()
        except (EOFError, OSError):
            process.join(1.0)
            raise ClientError(f"client process {index} exited with code {process.exitcode}") from None
        if kind == "error":
            raise ClientError(f"client process {index}:\n{payload}")
        if kind != expected:
            raise ClientError(f"client process {index}: {kind!r} where {expected!r} was due")
        return payload

    def close(self, grace_seconds: float = 5.0) -> None:
        """Asks every process to exit; terminates those still running after the grace period."""
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send(None)
        deadline = time.monotonic() + grace_seconds
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join()
        for connection in self._connections:
            connection.close()

    def __enter__(self) -> ClientPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
