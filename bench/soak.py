"""Soak benchmark: a steady mixed load on `tandem serve` for a long time, watching for leaks and drift.

    .venv/bin/python bench/soak.py --duration 1800 --output docs/results/soak-cpu.json

Closed-loop clients (--concurrency, each waits --think-seconds between requests) send, in turn:
gRPC streams, gRPC streams cancelled after a few tokens, gRPC requests with stop strings, HTTP
completions (plain and streamed), HTTP chat streams dropped mid-stream. Every --sample-seconds a sample
records each process's RSS (frontend, prefill, decode; /proc, re-read after a worker restart), each
worker's KV usage, held leases and queue (GetStats), and the window's requests: count, errors,
cancellations, latency p50/p99 (completed requests only). After --duration the load stops, in-flight
requests finish, and a last sample checks that every KV block is free again.

Trend: the least-squares slope of each process's RSS (MiB/hour) and of each worker's KV usage
(fraction/hour) over the samples, and the first vs the last window's p99 latency. One table is printed;
--output writes settings, samples and trend as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import random
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO_ROOT / "bench":
    sys.path[0] = str(REPO_ROOT)  # run as a script: import the repository's packages, not bench/*

import grpc  # noqa: E402

from bench._common import format_table, percentiles, post_sse, write_json  # noqa: E402
from bench.serve import QUESTIONS, start_system  # noqa: E402
from protos import generation_pb2 as g  # noqa: E402
from protos import generation_pb2_grpc, worker_pb2, worker_pb2_grpc  # noqa: E402

KINDS = ["grpc stream", "grpc cancel", "grpc stop", "http", "http stream", "http drop"]
NUM_TOKENS_BEFORE_CANCEL = 3
STOP_STRINGS = [".", "\n", " the"]
REQUEST_TIMEOUT_SECONDS = 300.0


@dataclass
class Finished:
    kind: str
    ended_at: float  # time.monotonic()
    latency_seconds: float
    outcome: str  # "ok" | "cancelled" | "error: <what>"


@dataclass
class Load:
    """The clients' shared state: what finished since the last sample."""

    finished: list[Finished] = field(default_factory=list)
    num_sent: int = 0
    is_running: bool = True


# ---- the requests --------------------------------------------------------------------------------


def _grpc_request(kind: str, question: str, max_tokens: int) -> g.GenerateRequest:
    sampling = g.SamplingParams(max_tokens=max_tokens, temperature=0.7, seed=len(question))
    if kind == "grpc stop":
        sampling.stop.extend(STOP_STRINGS)
    else:
        sampling.ignore_eos = True
    return g.GenerateRequest(chat=g.ChatMessages(messages=[g.ChatMessage(role="user", content=question)]),
                             sampling=sampling)


async def _grpc_call(stub, kind: str, question: str, max_tokens: int) -> str:
    call = stub.Generate(_grpc_request(kind, question, max_tokens), timeout=REQUEST_TIMEOUT_SECONDS)
    num_tokens = 0
    async for response in call:
        num_tokens += len(response.chunk.token_ids)
        if kind == "grpc cancel" and num_tokens >= NUM_TOKENS_BEFORE_CANCEL:
            call.cancel()
            return "cancelled"
        if response.HasField("final"):
            return "ok"
    return "error: stream ended without a final message"


def _http_post(url: str, body: dict) -> int:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_SECONDS) as response:
            json.loads(response.read())
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


async def _http_call(http_url: str, kind: str, question: str, max_tokens: int) -> str:
    body = {"max_tokens": max_tokens, "temperature": 0.7, "seed": len(question), "ignore_eos": True}
    if kind == "http":
        status = await asyncio.to_thread(_http_post, f"{http_url}/completions", {**body, "prompt": question})
        return "ok" if status == 200 else f"error: HTTP {status}"
    host, port = http_url.removeprefix("http://").removesuffix("/v1").rsplit(":", 1)
    body = {**body, "stream": True, "messages": [{"role": "user", "content": question}]}
    num_events = 0
    async for _, event in post_sse(host, int(port), "/v1/chat/completions", body):
        if "error" in event:
            return f"error: in-band {event['error'].get('code')}"
        num_events += 1
        if kind == "http drop" and num_events >= NUM_TOKENS_BEFORE_CANCEL:
            return "cancelled"  # leaving the generator closes the connection mid-stream
    return "ok"


async def _client(index: int, load: Load, stub, http_url: str, args: argparse.Namespace) -> None:
    rng = random.Random(args.seed * 1000 + index)
    kinds = itertools.cycle(KINDS[index % len(KINDS):] + KINDS[:index % len(KINDS)])
    while load.is_running:
        kind, question = next(kinds), rng.choice(QUESTIONS)
        max_tokens = rng.randint(max(1, args.max_tokens // 2), args.max_tokens)
        started = time.monotonic()
        load.num_sent += 1
        try:
            if kind.startswith("grpc"):
                outcome = await _grpc_call(stub, kind, question, max_tokens)
            else:
                outcome = await _http_call(http_url, kind, question, max_tokens)
        except grpc.aio.AioRpcError as exc:
            outcome = f"error: {exc.code().name}"
        except Exception as exc:  # noqa: BLE001 - counted, and the load goes on
            outcome = f"error: {type(exc).__name__}"
        ended = time.monotonic()
        load.finished.append(Finished(kind, ended, ended - started, outcome))
        await asyncio.sleep(args.think_seconds * rng.uniform(0.5, 1.5))


# ---- the samples ---------------------------------------------------------------------------------


def rss_mib(pid: int) -> float | None:
    """Resident set size of `pid` in MiB (None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def read_ready(ready_file: Path) -> dict:
    """`tandem serve`'s ready file (rewritten in place after a restart: retry a half-written one)."""
    for _ in range(50):
        try:
            return json.loads(ready_file.read_text())
        except json.JSONDecodeError:
            time.sleep(0.05)
    raise RuntimeError(f"{ready_file} is not valid JSON")


async def worker_stats(ready: dict) -> dict[str, dict]:
    """GetStats of every worker, by name (prefill-0, decode-0, ...)."""
    stats = {}
    for role, stub_type in (("prefill", worker_pb2_grpc.PrefillWorkerStub), ("decode", worker_pb2_grpc.DecodeWorkerStub)):
        for index, address in enumerate(ready[role]):
            async with grpc.aio.insecure_channel(address) as channel:
                pb = await stub_type(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=10)
            stats[f"{role}-{index}"] = {"kv_cache_usage": pb.kv_cache_usage, "num_free_blocks": pb.num_free_blocks,
                                        "num_total_blocks": pb.num_total_blocks, "num_held_leases": pb.num_held_leases,
                                        "num_running": pb.num_running, "num_waiting": pb.num_waiting}
    return stats


async def take_sample(ready_file: Path, load: Load, started: float) -> dict:
    ready = read_ready(ready_file)
    window, load.finished = load.finished, []
    completed = [f.latency_seconds * 1000 for f in window if f.outcome == "ok"]
    errors = [f.outcome for f in window if f.outcome.startswith("error")]
    latency = percentiles(completed)
    return {
        "seconds": time.monotonic() - started,
        "rss_mib": {name: rss_mib(pid) for name, pid in sorted(ready["pids"].items())},
        "workers": await worker_stats(ready),
        "num_completed": len(completed), "num_cancelled": sum(f.outcome == "cancelled" for f in window),
        "num_errors": len(errors), "errors": sorted(set(errors)),
        "latency_ms_p50": latency["p50"], "latency_ms_p99": latency["p99"],
    }


def slope_per_hour(seconds: list[float], values: list[float | None]) -> float | None:
    """Least-squares slope of `values` over time, per hour (None with fewer than 2 samples)."""
    points = [(s, v) for s, v in zip(seconds, values) if v is not None]
    if len(points) < 2:
        return None
    hours = np.array([s for s, _ in points]) / 3600
    return float(np.polyfit(hours, np.array([v for _, v in points]), 1)[0])


def _slopes(samples: list[dict]) -> dict:
    seconds = [s["seconds"] for s in samples]
    names = sorted({name for s in samples for name in s["rss_mib"]})
    workers = sorted({name for s in samples for name in s["workers"]})
    return {
        "rss_mib_per_hour": {n: slope_per_hour(seconds, [s["rss_mib"].get(n) for s in samples]) for n in names},
        "kv_usage_per_hour": {n: slope_per_hour(seconds, [s["workers"][n]["kv_cache_usage"] for s in samples])
                              for n in workers},
    }


def trend(samples: list[dict]) -> dict:
    """Slopes over every sample, and over the second half alone (past the warm-up: allocator pools and
    caches filling up early are not a leak; growth that goes on in the second half is)."""
    with_p99 = [s for s in samples if s["latency_ms_p99"] is not None]
    return {
        **_slopes(samples),
        "second_half": _slopes(samples[len(samples) // 2:]),
        "first_window_p99_ms": with_p99[0]["latency_ms_p99"] if with_p99 else None,
        "last_window_p99_ms": with_p99[-1]["latency_ms_p99"] if with_p99 else None,
    }


# ---- running it ----------------------------------------------------------------------------------


async def soak(ready_file: Path, args: argparse.Namespace) -> dict:
    ready = read_ready(ready_file)
    load = Load()
    samples = []
    async with grpc.aio.insecure_channel(ready["frontend"]) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        started = time.monotonic()
        clients = [asyncio.ensure_future(_client(i, load, stub, ready["http"], args)) for i in range(args.concurrency)]
        samples.append(await take_sample(ready_file, load, started))  # the baseline, under load from the start
        while time.monotonic() - started < args.duration:
            await asyncio.sleep(min(args.sample_seconds, max(0.0, args.duration - (time.monotonic() - started))))
            samples.append(await take_sample(ready_file, load, started))
            print(_row(samples[-1]), flush=True)
        load.is_running = False
        await asyncio.gather(*clients)
    last = await take_sample(ready_file, load, started)  # the requests that ended after the last sample
    for key in ("num_completed", "num_cancelled", "num_errors"):
        samples[-1][key] += last[key]
    samples[-1]["errors"] = sorted({*samples[-1]["errors"], *last["errors"]})
    idle = await _wait_idle(ready_file)
    return {"num_sent": load.num_sent, "samples": samples, "idle_after": idle, "trend": trend(samples)}


async def _wait_idle(ready_file: Path, timeout_seconds: float = 60.0) -> dict:
    """Every worker's stats once its pool is all free and nothing runs, waits or is leased (or at the timeout)."""
    deadline = time.monotonic() + timeout_seconds
    while True:
        stats = await worker_stats(read_ready(ready_file))
        is_idle = all(s["num_free_blocks"] == s["num_total_blocks"] and s["num_held_leases"] == 0 and
                      s["num_running"] == 0 and s["num_waiting"] == 0 for s in stats.values())
        if is_idle or time.monotonic() > deadline:
            return {"is_idle": is_idle, "workers": stats}
        await asyncio.sleep(0.5)


HEADERS = ["t (s)", "RSS MiB (f/p/d)", "KV use (p/d)", "leases", "done", "cancelled", "errors", "p50 ms", "p99 ms"]


def _row_values(sample: dict) -> list[object]:
    rss = sample["rss_mib"]

    def first(prefix: str, values: dict, key=None):
        found = [v if key is None else v[key] for n, v in sorted(values.items()) if n.startswith(prefix)]
        return found[0] if found else None

    mib = "/".join(f"{first(p, rss) or 0:.0f}" for p in ("frontend", "prefill", "decode"))
    kv = "/".join(f"{first(p, sample['workers'], 'kv_cache_usage'):.3f}" for p in ("prefill", "decode"))
    leases = sum(w["num_held_leases"] for w in sample["workers"].values())
    p50, p99 = sample["latency_ms_p50"], sample["latency_ms_p99"]
    return [f"{sample['seconds']:.0f}", mib, kv, leases, sample["num_completed"], sample["num_cancelled"],
            sample["num_errors"], "-" if p50 is None else f"{p50:.0f}", "-" if p99 is None else f"{p99:.0f}"]


def _row(sample: dict) -> str:
    return "  ".join(str(v) for v in _row_values(sample))


def report_text(result: dict) -> str:
    table = format_table(HEADERS, [_row_values(s) for s in result["samples"]])
    t = result["trend"]
    lines = [table, "trend (least-squares slope over the samples):"]
    for name, value in t["rss_mib_per_hour"].items():
        if value is not None:
            late = t["second_half"]["rss_mib_per_hour"].get(name)
            lines.append(f"  RSS {name}: {value:+.1f} MiB/hour ({'-' if late is None else f'{late:+.1f}'} "
                         "in the second half)")
    for name, value in t["kv_usage_per_hour"].items():
        if value is not None:
            late = t["second_half"]["kv_usage_per_hour"].get(name)
            lines.append(f"  KV usage {name}: {value:+.4f} /hour ({'-' if late is None else f'{late:+.4f}'} "
                         "in the second half)")
    lines.append(f"  p99 latency: first window {t['first_window_p99_ms']} ms, last window {t['last_window_p99_ms']} ms")
    lines.append(f"after the load: every pool free and no lease held: {result['idle_after']['is_idle']}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=1800.0, help="seconds of load")
    parser.add_argument("--sample-seconds", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--concurrency", type=int, default=4, help="closed-loop clients")
    parser.add_argument("--think-seconds", type=float, default=0.5, help="mean pause of a client between requests")
    parser.add_argument("--max-tokens", type=int, default=32, help="each request asks for max-tokens/2..max-tokens")
    parser.add_argument("--num-prefill", type=int, default=1)
    parser.add_argument("--num-decode", type=int, default=1)
    parser.add_argument("--engine-args", default="--kv-cache-memory 256MiB --max-model-len 2048",
                        help="flags passed to every worker")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.duration <= 0 or args.sample_seconds <= 0 or args.concurrency < 1 or args.max_tokens < 1:
        parser.error("--duration, --sample-seconds, --concurrency and --max-tokens must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="tandem-bench-soak-"))
    print(f"starting tandem serve (logs in {log_dir})", flush=True)
    # serve.start_system turns HTTP off; a later --http-port wins (argparse keeps the last one)
    process, _ = start_system(log_dir, args.num_prefill, args.num_decode,
                              [*args.engine_args.split(), "--http-port", "0"])
    try:
        print("  ".join(HEADERS), flush=True)
        result = asyncio.run(soak(log_dir / "serve.ready.json", args))
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)
    print(report_text(result))
    write_json(args.output, {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
        "settings": vars(args), "command": " ".join(sys.argv), **result,
    })
    return 0 if result["idle_after"]["is_idle"] else 1


if __name__ == "__main__":
    sys.exit(main())
