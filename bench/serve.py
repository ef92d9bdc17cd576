"""Serving benchmark: TTFT, inter-token latency and output tokens/s through the gRPC frontend at
several concurrency levels, next to transformers `generate` run one request at a time.

    .venv/bin/python bench/serve.py --output bench-serve-cpu.json          # starts `tandem serve` itself
    .venv/bin/python bench/serve.py --address localhost:50051               # an already running system

Each level runs `concurrency` closed-loop clients (each sends its next request when the previous one
finished). Every request is a chat prompt with greedy sampling that ignores EOS, so every request
(and the transformers baseline, on the same prompt token ids) generates exactly --max-tokens tokens.
TTFT = request sent -> first token received; ITL = gap between consecutive tokens of one stream;
output tokens/s = all tokens of a level / the level's wall time. The table is printed last;
--output also writes everything as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if sys.path and Path(sys.path[0]).resolve() == REPO_ROOT / "bench":
    sys.path[0] = str(REPO_ROOT)  # run as a script: import the repository's packages, not bench/*

import grpc  # noqa: E402

from protos import generation_pb2, generation_pb2_grpc  # noqa: E402

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in simple words.",
    "Write a short poem about the sea.", "Why is the sky blue?", "Give me three tips for learning Python.",
    "What causes the seasons on Earth?", "Describe a cat to someone who has never seen one.",
    "How do airplanes stay in the air?", "What is the difference between weather and climate?",
    "Summarize the story of Cinderella.", "How does a refrigerator work?", "Name five fruits that are red.",
    "What is machine learning?", "Why do we need sleep?", "How are rainbows formed?",
    "What should I pack for a weekend hike?",
]


@dataclass
class RequestTiming:
    ttft_seconds: float
    token_gaps_seconds: list[float]  # between consecutive tokens of the stream
    num_output_tokens: int
    latency_seconds: float


@dataclass
class LevelResult:
    name: str  # "tandem c=4" or "transformers (sequential)"
    concurrency: int
    num_requests: int
    wall_seconds: float
    ttft_ms_p50: float
    ttft_ms_p99: float
    itl_ms_p50: float
    itl_ms_p99: float
    output_tokens_per_second: float
    requests: list[RequestTiming] = field(repr=False, default_factory=list)


def summarize(name: str, concurrency: int, timings: list[RequestTiming], wall_seconds: float) -> LevelResult:
    ttfts = np.array([t.ttft_seconds for t in timings]) * 1000
    gaps = np.array([g for t in timings for g in t.token_gaps_seconds] or [0.0]) * 1000
    num_tokens = sum(t.num_output_tokens for t in timings)
    return LevelResult(
        name, concurrency, len(timings), wall_seconds,
        float(np.percentile(ttfts, 50)), float(np.percentile(ttfts, 99)),
        float(np.percentile(gaps, 50)), float(np.percentile(gaps, 99)),
        num_tokens / wall_seconds, timings,
    )


# ---- Tandem over gRPC ---------------------------------------------------------------------------


async def _timed_request(stub, question: str, max_tokens: int) -> RequestTiming:
    request = generation_pb2.GenerateRequest(
        chat=generation_pb2.ChatMessages(messages=[generation_pb2.ChatMessage(role="user", content=question)]),
        sampling=generation_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
    )
    start = time.perf_counter()
    token_times: list[float] = []
    async for response in stub.Generate(request, timeout=1800):
        if response.HasField("chunk") and response.chunk.token_ids:
            now = time.perf_counter()
            token_times += [now] * len(response.chunk.token_ids)
    end = time.perf_counter()
    gaps = [b - a for a, b in zip(token_times, token_times[1:])]
    return RequestTiming(token_times[0] - start, gaps, len(token_times), end - start)


async def run_level(address: str, concurrency: int, num_requests: int, max_tokens: int) -> LevelResult:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(num_requests)]
        queue: asyncio.Queue[str] = asyncio.Queue()
        for question in questions:
            queue.put_nowait(question)
        timings: list[RequestTiming] = []

        async def client() -> None:
            while not queue.empty():
                timings.append(await _timed_request(stub, queue.get_nowait(), max_tokens))

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return summarize(f"tandem c={concurrency}", concurrency, timings, wall)


# ---- transformers baseline ----------------------------------------------------------------------


def run_transformers(num_requests: int, max_tokens: int, threads: int) -> LevelResult:
    """The same chat prompts through transformers `generate`, greedy, one request at a time."""
    import torch
    import transformers

    from common.model.registry import resolve_model
    from common.tokenizer import apply_chat_template, load_tokenizer

    torch.set_num_threads(threads)
    folder = resolve_model(None).folder
    tokenizer = load_tokenizer(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    class TokenClock(transformers.StoppingCriteria):
        """Called once per generated token: records when it was produced; never stops generation."""

        def __init__(self):
            self.times: list[float] = []

        def __call__(self, input_ids, scores, **kwargs):
            self.times.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def generate(question: str, num_tokens: int) -> RequestTiming:
        prompt = apply_chat_template(tokenizer, [{"role": "user", "content": question}])
        clock = TokenClock()
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(torch.tensor([prompt]), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                           do_sample=False, stopping_criteria=[clock], pad_token_id=tokenizer.eos_token_id)
        end = time.perf_counter()
        gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
        return RequestTiming(clock.times[0] - start, gaps, len(clock.times), end - start)

    generate(QUESTIONS[0], 4)  # warm-up
    start = time.perf_counter()
    timings = [generate(QUESTIONS[i % len(QUESTIONS)], max_tokens) for i in range(num_requests)]
    return summarize("transformers (sequential)", 1, timings, time.perf_counter() - start)


# ---- system start-up, table, main -------------------------------------------------------------


def start_system(log_dir: Path, num_prefill: int, num_decode: int, engine_args: list[str]) -> tuple[subprocess.Popen, str]:
    ready_file = log_dir / "serve.ready.json"
    command = [sys.executable, "-m", "services.cli", "serve", "--port", "0", "--http-port", "-1",
               "--num-prefill", str(num_prefill), "--num-decode", str(num_decode), "--log-dir", str(log_dir),
               "--ready-file", str(ready_file), *engine_args]
    log = open(log_dir / "serve.log", "w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                               env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    while not ready_file.exists():
        if process.poll() is not None:
            raise RuntimeError(f"tandem serve exited with {process.returncode}; see {log_dir}")
        time.sleep(0.5)
    return process, json.loads(ready_file.read_text())["frontend"]


def format_table(results: list[LevelResult], max_tokens: int) -> str:
    lines = [
        f"| run ({max_tokens} output tokens per request) | requests | TTFT p50 (ms) | TTFT p99 (ms) "
        "| ITL p50 (ms) | ITL p99 (ms) | output tokens/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.name} | {r.num_requests} | {r.ttft_ms_p50:.0f} | {r.ttft_ms_p99:.0f} | {r.itl_ms_p50:.0f} "
                     f"| {r.itl_ms_p99:.0f} | {r.output_tokens_per_second:.1f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--address", default=None, help="a running frontend; default: start `tandem serve`")
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests-per-client", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    parser.add_argument("--num-prefill", type=int, default=1)
    parser.add_argument("--num-decode", type=int, default=1)
    parser.add_argument("--engine-args", default="--kv-cache-memory 256MiB --max-model-len 2048",
                        help="flags passed to every worker when this script starts the system")
    parser.add_argument("--transformers-requests", type=int, default=4, help="0 skips the baseline")
    parser.add_argument("--transformers-threads", type=int, default=1, help="torch threads for the baseline")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",")]
    process = None
    address = args.address
    if address is None:
        log_dir = Path(tempfile.mkdtemp(prefix="tandem-bench-serve-"))
        print(f"starting tandem serve (logs in {log_dir})", flush=True)
        process, address = start_system(log_dir, args.num_prefill, args.num_decode, args.engine_args.split())
    try:
        asyncio.run(run_level(address, 1, 1, 4))  # warm-up
        results = []
        for concurrency in levels:
            result = asyncio.run(run_level(address, concurrency, concurrency * args.requests_per_client, args.max_tokens))
            print(f"{result.name}: {result.output_tokens_per_second:.1f} output tokens/s", flush=True)
            results.append(result)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    if args.transformers_requests > 0:
        results.append(run_transformers(args.transformers_requests, args.max_tokens, args.transformers_threads))
    table = format_table(results, args.max_tokens)
    print(table)
    if args.output:
        report = {
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_average": os.getloadavg()},
            "settings": vars(args),
            "results": [asdict(r) for r in results],
            "table": table,
        }
        Path(args.output).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
