"""Frontend relay capacity on CPU: output tokens/s that one `tandem frontend` process relays.

    .venv/bin/python bench/frontend_relay.py --output bench-frontend-relay.json
    .venv/bin/python bench/frontend_relay.py --quick          # a check, not a measurement: exact counts
    .venv/bin/python bench/frontend_relay.py --api-server-count 2 --no-pin   # N frontend processes, one port

    clients (this process) ──gRPC Generate / HTTP SSE──► tandem frontend (the real one, own process)
                                                            ├─Prefill────────► prefill stand-in
                                                            └─DecodeStream───► decode stand-in(s)

The stand-ins (bench/_relay_standins.py, processes of their own) answer as fast as they can: token #1
and a KV handle at once; then one token per open request per decode step (--step-ms), sent as the
decode worker sends them. Each level runs `concurrency` closed-loop clients (the next request when the
previous one ended) with token-id prompts, greedy, ignore_eos, --max-tokens. After --warmup seconds,
tokens received during --duration seconds give the relayed tokens/s, and the frontend's CPU time over
the same window its CPU% (100 = one core, gRPC's threads included) and CPU microseconds per token. By
default the frontend runs alone on the first core and everything else on the others. With
--api-server-count N the frontend is N processes sharing its ports (`tandem frontend --api-server-count`):
CPU figures are their sum, the loop's the sum of their loops, and each level reports how many requests
each process admitted (the kernel spreads connections: gRPC clients use --grpc-connections of them,
HTTP clients one each); they take the first N cores when the machine has more. Clients then stop
sending, and every request must have received exactly --max-tokens tokens whose ids and text match the
stand-ins' continuation. The table is printed last; --output writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO_ROOT / "bench":
    sys.path[0] = str(REPO_ROOT)  # run as a script: import the repository's packages, not bench/*

import grpc  # noqa: E402
import psutil  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from bench._relay_standins import Script, make_script, write_json  # noqa: E402
from protos import generation_pb2, generation_pb2_grpc  # noqa: E402

STANDINS = Path(__file__).resolve().with_name("_relay_standins.py")


# ---- clients (this process) ------------------------------------------------------------------------

@dataclass
class Load:
    """What every client of a level sends, and how it checks the answers."""

    script: Script
    tokenizer: object
    model_name: str
    max_tokens: int
    _expected: dict = field(default_factory=dict)  # prompt index -> (token ids, text)

    def expected(self, prompt_index: int) -> tuple[list[int], str]:
        """The stand-ins' continuation of prompt `prompt_index`, and its text after the prompt."""
        if prompt_index not in self._expected:
            prompt = self.script.prompt(prompt_index)
            output = self.script.output(self.script.continuation_start(prompt), 0, self.max_tokens)
            context = prompt[-5:]  # the frontend's detokenizer decodes 5 prompt tokens as context
            text = self.tokenizer.decode(context + output)[len(self.tokenizer.decode(context)):]
            self._expected[prompt_index] = (output, text)
        return self._expected[prompt_index]


@dataclass
class Counters:
    num_tokens: int = 0  # received by clients
    num_messages: int = 0  # gRPC chunks / SSE chunks received
    num_requests: int = 0  # finished and checked
    errors: list[str] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)  # seconds from sending a request to its first token


def _check(load: Load, prompt_index: int, token_ids: list[int] | None, num_tokens: int, text: str,
           is_length: bool, counters: Counters) -> None:
    expected_ids, expected_text = load.expected(prompt_index)
    problems = []
    if num_tokens != load.max_tokens or (token_ids is not None and token_ids != expected_ids):
        problems.append(f"{num_tokens} tokens instead of {load.max_tokens} (or other token ids)")
    if text != expected_text:
        problems.append(f"text {text[:40]!r}... differs from {expected_text[:40]!r}...")
    if not is_length:
        problems.append("finish reason is not length")
    if problems:
        counters.errors.append(f"prompt {prompt_index}: " + "; ".join(problems))
    counters.num_requests += 1


async def grpc_request(stub, load: Load, prompt_index: int, counters: Counters) -> None:
    request = generation_pb2.GenerateRequest(
        token_ids=generation_pb2.TokenIds(ids=load.script.prompt(prompt_index)),
        sampling=generation_pb2.SamplingParams(max_tokens=load.max_tokens, temperature=0, ignore_eos=True))
    token_ids: list[int] = []
    texts: list[str] = []
    final = None
    sent = time.monotonic()
    async for response in stub.Generate(request, timeout=300):
        if response.HasField("chunk"):
            chunk = response.chunk
            if not token_ids:
                counters.ttfts.append(time.monotonic() - sent)
            token_ids.extend(chunk.token_ids)
            texts.append(chunk.text)
            counters.num_tokens += len(chunk.token_ids)
            counters.num_messages += 1
        else:
            final = response.final
    is_length = final is not None and final.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    if final is not None and final.usage.completion_tokens != len(token_ids):
        counters.errors.append(f"prompt {prompt_index}: usage says {final.usage.completion_tokens} tokens")
    _check(load, prompt_index, token_ids, len(token_ids), "".join(texts), is_length, counters)


class HttpConnection:
    """A minimal HTTP/1.1 keep-alive client for SSE responses (chunked), cheap enough to drive the load."""

    def __init__(self, port: int):
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def events(self, path: str, payload: dict):
        """POSTs `payload`; yields each SSE `data:` payload (bytes) of the response."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port)
        body = json.dumps(payload).encode()
        self._writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
        status = await self._reader.readline()
        headers = (await self._reader.readuntil(b"\r\n\r\n")).lower()
        if b" 200 " not in status or b"transfer-encoding: chunked" not in headers:
            raise RuntimeError(f"HTTP answer {status!r}: {await self._reader.read(2000)!r}")
        pending = b""
        while True:
            size = int((await self._reader.readline()).strip(), 16)
            data = await self._reader.readexactly(size + 2)
            if size == 0:
                return
            pending += data[:-2]
            *events, pending = pending.split(b"\n\n")
            for event in events:
                yield event[len(b"data: "):]


async def http_request(connection: HttpConnection, load: Load, prompt_index: int, counters: Counters) -> None:
    payload = {"model": load.model_name, "prompt": load.script.prompt(prompt_index), "max_tokens": load.max_tokens,
               "temperature": 0, "ignore_eos": True, "stream": True,
               "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    num_tokens, texts, finish_reason = 0, [], None
    sent = time.monotonic()
    async for data in connection.events("/v1/completions", payload):
        if data == b"[DONE]":
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            raise RuntimeError(f"in-band error: {chunk['error']}")
        usage_tokens = chunk["usage"]["completion_tokens"]
        if num_tokens == 0 < usage_tokens:
            counters.ttfts.append(time.monotonic() - sent)
        counters.num_tokens += usage_tokens - num_tokens
        num_tokens = usage_tokens
        for choice in chunk["choices"]:
            texts.append(choice["text"])
            finish_reason = choice["finish_reason"] or finish_reason
            counters.num_messages += 1
    _check(load, prompt_index, None, num_tokens, "".join(texts), finish_reason == "length", counters)


async def run_client(path: str, target, load: Load, first_index: int, step: int, counters: Counters,
                     keep_going) -> None:
    """Closed loop: the next request once the previous one ended, while keep_going(number sent)."""
    prompt_index, num_sent = first_index, 0
    while keep_going(num_sent):
        try:
            if path == "grpc":
                await grpc_request(target, load, prompt_index, counters)
            else:
                await http_request(target, load, prompt_index, counters)
        except (grpc.aio.AioRpcError, RuntimeError, OSError, asyncio.IncompleteReadError) as exc:
            counters.errors.append(f"prompt {prompt_index}: {type(exc).__name__}: {exc}")
            if path == "http":
                target = HttpConnection(target.port)  # the connection is in an unknown state
        prompt_index += step
        num_sent += 1


# ---- one level: `concurrency` clients on one path ----------------------------------------------------

@dataclass
class LevelResult:
    path: str  # "grpc" (tandem.v1.Generation/Generate) | "http" (/v1/completions, SSE)
    concurrency: int
    window_seconds: float
    num_window_tokens: int  # tokens clients received during the window
    tokens_per_second: float  # relayed by the frontend
    messages_per_second: float  # frontend -> clients (gRPC chunks / SSE chunks)
    worker_messages_per_second: float  # decode stand-ins -> frontend
    frontend_cpu_percent: float  # 100 = one core
    frontend_loop_cpu_percent: float  # its main thread (the event loop) alone
    frontend_cpu_us_per_token: float  # frontend CPU time per relayed token (all its threads)
    client_cpu_percent: float
    client_loop_cpu_percent: float
    standins_cpu_percent: float
    offered_tokens_per_second: float  # concurrency x steps per second
    ttft_ms_p50: float  # request sent -> first token (the closed loop queues here once the frontend is full)
    requests_by_api_server: dict[str, int]  # requests each frontend process admitted during the level
    num_requests: int  # finished, each checked token for token
    num_tokens: int  # all tokens received, warm-up and drain included
    errors: list[str] = field(default_factory=list)


@dataclass
class Processes:
    frontend: subprocess.Popen
    standins: list[subprocess.Popen]
    standin_stats: list[Path]  # decode stand-ins' counter files
    api_server_pids: list[int]  # the frontend's serving processes (its own pid with one)

    def snapshot(self) -> dict:
        stats = [json.loads(path.read_text()) for path in self.standin_stats]
        own = psutil.Process().cpu_times()
        pids = {self.frontend.pid, *self.api_server_pids}
        return {"time": time.monotonic(), "frontend_cpu": sum(_cpu_seconds(pid) for pid in pids),
                "frontend_loop_cpu": sum(_main_thread_cpu_seconds(pid) for pid in self.api_server_pids),
                "standins_cpu": sum(_cpu_seconds(p.pid) for p in self.standins),
                "client_cpu": own.user + own.system, "client_loop_cpu": _main_thread_cpu_seconds(os.getpid()),
                "worker_messages": sum(s["num_messages"] for s in stats)}


def _start_profiler(args, pid: int, name: str) -> subprocess.Popen | None:
    """py-spy (pip install py-spy) on the frontend during the window: raw stacks to --profile-dir."""
    if not args.profile_dir:
        return None
    Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
    output = Path(args.profile_dir) / f"frontend-{name}.txt"
    subprocesses = ["--subprocesses"] if args.api_server_count > 1 else []  # the API servers
    return subprocess.Popen(["py-spy", "record", "--pid", str(pid), *subprocesses, "--duration", str(int(args.duration)), "--gil",
                             "--rate", "250", "--format", "raw", "--output", str(output)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _cpu_seconds(pid: int) -> float:
    cpu = psutil.Process(pid).cpu_times()
    return cpu.user + cpu.system


def requests_by_api_server(http_port: int) -> dict[str, int]:
    """tandem:api_server_requests_total by frontend process, from the frontend's (merged) /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {sample.labels["api_server"]: int(sample.value) for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == "tandem:api_server_requests_total"}


def _main_thread_cpu_seconds(pid: int) -> float:
    """CPU time of the process's main thread: its event loop (gRPC's own threads left out)."""
    thread = next(t for t in psutil.Process(pid).threads() if t.id == pid)
    return thread.user_time + thread.system_time


async def run_level(args, processes: Processes, ports: dict, load: Load, path: str, concurrency: int) -> LevelResult:
    counters = Counters()
    stop_at = [float("inf")]
    if args.quick:
        def keep_going(num_sent: int) -> bool:
            return num_sent < args.requests_per_client
    else:
        def keep_going(num_sent: int) -> bool:
            return time.monotonic() < stop_at[0]
    # Each channel a connection of its own (channels alike otherwise share one), for the kernel to spread.
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{ports['port']}", [("grpc.use_local_subchannel_pool", 1)])
                for _ in range(min(concurrency, args.grpc_connections))]
    targets = [generation_pb2_grpc.GenerationStub(channels[i % len(channels)]) if path == "grpc"
               else HttpConnection(ports["http_port"]) for i in range(concurrency)]
    admitted_before = await asyncio.to_thread(requests_by_api_server, ports["http_port"])
    clients = [asyncio.create_task(run_client(path, targets[i], load, i, concurrency, counters, keep_going))
               for i in range(concurrency)]
    if args.quick:
        before = processes.snapshot() | {"tokens": 0, "messages": 0}
        await asyncio.gather(*clients)
        after = processes.snapshot() | {"tokens": counters.num_tokens, "messages": counters.num_messages}
    else:
        await asyncio.sleep(args.warmup)
        before = processes.snapshot() | {"tokens": counters.num_tokens, "messages": counters.num_messages}
        profiler = _start_profiler(args, processes.frontend.pid, f"c{concurrency}-{path}")
        await asyncio.sleep(args.duration)
        after = processes.snapshot() | {"tokens": counters.num_tokens, "messages": counters.num_messages}
        stop_at[0] = time.monotonic()
        await asyncio.gather(*clients)
        if profiler is not None:
            profiler.wait()
    for channel in channels:
        await channel.close()
    admitted_after = await asyncio.to_thread(requests_by_api_server, ports["http_port"])
    admitted = {index: count - admitted_before.get(index, 0) for index, count in sorted(admitted_after.items())}
    seconds = after["time"] - before["time"]
    if args.quick:
        expected = concurrency * args.requests_per_client
        if counters.num_requests != expected or counters.num_tokens != expected * args.max_tokens:
            counters.errors.append(f"{counters.num_requests} requests / {counters.num_tokens} tokens, expected "
                                   f"{expected} / {expected * args.max_tokens}")
    elif counters.num_tokens != counters.num_requests * args.max_tokens:
        counters.errors.append(f"{counters.num_tokens} tokens for {counters.num_requests} requests")

    def rate(key: str) -> float:
        return (after[key] - before[key]) / seconds

    return LevelResult(
        path, concurrency, seconds, after["tokens"] - before["tokens"], rate("tokens"), rate("messages"),
        rate("worker_messages"), 100 * rate("frontend_cpu"), 100 * rate("frontend_loop_cpu"),
        1e6 * rate("frontend_cpu") / max(rate("tokens"), 1.0),
        100 * rate("client_cpu"), 100 * rate("client_loop_cpu"), 100 * rate("standins_cpu"),
        concurrency * 1000 / args.step_ms, 1000 * statistics.median(counters.ttfts or [0.0]), admitted,
        counters.num_requests, counters.num_tokens, counters.errors[:10])


# ---- processes, table, main ------------------------------------------------------------------------

def _start(argv: list[str], log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}  # tracing off
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TANDEM_OTLP_TRACES_ENDPOINT="")
    with open(log_path, "w") as log:
        return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT,
                                start_new_session=True)


def _wait_ready(process: subprocess.Popen, ready_path: Path, log_path: Path, timeout_seconds: float = 120) -> dict:
    deadline = time.monotonic() + timeout_seconds
    while not ready_path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{process.args[:4]} did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.1)
    return json.loads(ready_path.read_text())


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def start_processes(args, work_dir: Path, setup_path: Path) -> tuple[Processes, dict]:
    started: list[subprocess.Popen] = []
    try:
        addresses, stats_paths = {"prefill": [], "decode": []}, []
        for index, role in enumerate(["prefill"] + ["decode"] * args.num_decode):
            ready, stats, log = (work_dir / f"{role}{index}.{suffix}" for suffix in ("ready", "stats", "log"))
            started.append(_start([sys.executable, str(STANDINS), role, str(setup_path), str(ready), str(stats)], log))
            addresses[role].append(f"127.0.0.1:{_wait_ready(started[-1], ready, log)['port']}")
            if role == "decode":
                stats_paths.append(stats)
        ready, log = work_dir / "frontend.ready", work_dir / "frontend.log"
        frontend = _start([sys.executable, "-m", "services.cli", "frontend", "--host", "127.0.0.1", "--port", "0",
                           "--http-port", "0", "--prefill-addresses", ",".join(addresses["prefill"]),
                           "--decode-addresses", ",".join(addresses["decode"]), "--ready-file", str(ready),
                           "--api-server-count", str(args.api_server_count), "--log-level", "WARNING"], log)
        started.append(frontend)
        if args.pin:
            _pin(frontend, started[:-1], args.api_server_count)  # before it starts its API servers: they inherit it
        ports = _wait_ready(frontend, ready, log)
        while not all(path.exists() for path in stats_paths):
            time.sleep(0.05)
        return Processes(frontend, started[:-1], stats_paths, ports.get("api_server_pids", [frontend.pid])), ports
    except BaseException:
        _stop(started)
        raise


def _pin(frontend: subprocess.Popen, others: list[subprocess.Popen], num_frontend_cores: int) -> None:
    """The frontend's processes on cores of their own (one per API server, their gRPC threads included);
    stand-ins and clients on the rest. Nothing is pinned without a core left for the rest."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) <= num_frontend_cores:
        return
    os.sched_setaffinity(frontend.pid, set(cores[:num_frontend_cores]))
    for process in others:
        os.sched_setaffinity(process.pid, set(cores[num_frontend_cores:]))
    os.sched_setaffinity(0, set(cores[num_frontend_cores:]))  # this process (the clients); later threads follow


def print_table(results: list[LevelResult]) -> None:
    columns = [("concurrency", 11), ("path", 5), ("offered", 8), ("tokens/s", 9), ("frontend CPU%", 13), ("(loop)", 6),
               ("us/token", 8), ("msgs/s", 7), ("tokens/msg", 10), ("worker msgs/s", 13), ("client CPU%", 11),
               ("stand-ins CPU%", 14), ("TTFT p50 ms", 11), ("requests/process", 16), ("checked", 7)]
    header = " ".join(f"{name:>{width}}" for name, width in columns)
    print(header)
    print("-" * len(header))
    for r in results:
        tokens_per_message = r.tokens_per_second / r.messages_per_second if r.messages_per_second else 0.0
        values = [r.concurrency, r.path, f"{r.offered_tokens_per_second:.0f}", f"{r.tokens_per_second:.0f}",
                  f"{r.frontend_cpu_percent:.0f}", f"{r.frontend_loop_cpu_percent:.0f}",
                  f"{r.frontend_cpu_us_per_token:.1f}", f"{r.messages_per_second:.0f}", f"{tokens_per_message:.1f}",
                  f"{r.worker_messages_per_second:.0f}", f"{r.client_cpu_percent:.0f}", f"{r.standins_cpu_percent:.0f}",
                  f"{r.ttft_ms_p50:.0f}", "/".join(map(str, r.requests_by_api_server.values())) or "-",
                  "ok" if not r.errors else "FAILED"]
        print(" ".join(f"{value:>{width}}" for value, (_, width) in zip(values, columns)))


DEFAULTS = {"concurrency": "64,256", "max_tokens": 512, "step_ms": 4.0}
QUICK_DEFAULTS = {"concurrency": "4,16", "max_tokens": 48, "step_ms": 1.0}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", help="comma-separated numbers of concurrent streams (default 64,256)")
    parser.add_argument("--paths", default="grpc,http", help="grpc, http or both")
    parser.add_argument("--max-tokens", type=int, help="tokens per request (default 512)")
    parser.add_argument("--step-ms", type=float, help="decode stand-in step time, one token per stream (default 4)")
    parser.add_argument("--num-decode", type=int, default=2, help="decode stand-in processes")
    parser.add_argument("--api-server-count", type=int, default=1,
                        help="frontend processes serving its ports (tandem frontend --api-server-count)")
    parser.add_argument("--grpc-connections", type=int, default=8,
                        help="gRPC connections the clients of a level share (the kernel spreads connections "
                             "among API servers, not requests)")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before the measured window")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds of the measured window")
    parser.add_argument("--quick", action="store_true",
                        help="a check, not a measurement: few streams, --requests-per-client each, exact counts")
    parser.add_argument("--requests-per-client", type=int, default=2, help="with --quick")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let the OS place processes (default: the frontend alone on the first core)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--profile-dir", default=None, help="py-spy the frontend during each window (raw stacks)")
    return parser


async def run_all(args, processes: Processes, ports: dict, load: Load) -> list[LevelResult]:
    results = []
    for concurrency in [int(c) for c in args.concurrency.split(",")]:
        for path in args.paths.split(","):
            results.append(await run_level(args, processes, ports, load, path, concurrency))
            r = results[-1]
            print(f"c={concurrency} {path}: {r.tokens_per_second:.0f} tokens/s, frontend CPU "
                  f"{r.frontend_cpu_percent:.0f}%, {r.num_requests} requests checked, {len(r.errors)} errors",
                  flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, value in (QUICK_DEFAULTS if args.quick else DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    from common.model.registry import resolve_model
    from common.tokenizer import load_tokenizer

    resolved = resolve_model(None, "auto")  # the embedded SmolLM2, as the frontend loads it
    tokenizer = load_tokenizer(resolved.folder)
    script = make_script(tokenizer)
    facts = {"model": resolved.name, "max_model_len": 8192, "vocab_size": len(tokenizer),
             "eos_token_ids": [tokenizer.eos_token_id]}
    load = Load(script, tokenizer, resolved.name, args.max_tokens)
    with tempfile.TemporaryDirectory(prefix="tandem-relay-") as tmp:
        work_dir = Path(tmp)
        setup_path = work_dir / "setup.json"
        write_json(setup_path, {"token_ids": script.token_ids, "char_starts": script.char_starts,
                                "facts": facts, "step_ms": args.step_ms})
        processes, ports = start_processes(args, work_dir, setup_path)
        try:
            results = asyncio.run(run_all(args, processes, ports, load))
        finally:
            _stop([processes.frontend, *processes.standins])
    print()
    is_pinned = args.pin and len(os.sched_getaffinity(0)) > args.api_server_count
    placement = (f"the frontend alone on {args.api_server_count} core(s)" if is_pinned
                 else "processes placed by the OS")
    print(f"frontend relay: {os.cpu_count()} CPU cores ({placement}), {args.api_server_count} frontend process(es), "
          f"{args.num_decode} decode stand-ins stepping every {args.step_ms} ms, max_tokens {args.max_tokens}")
    print_table(results)
    if args.output:
        Path(args.output).write_text(json.dumps({
            "benchmark": "frontend_relay", "args": vars(args), "machine": {
                "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                "python": platform.python_version(), "grpc": grpc.__version__},
            "results": [asdict(r) for r in results]}, indent=2))
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
