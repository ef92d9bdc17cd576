#!/usr/bin/env python3
"""Captures one real request's trace and draws it: docs/results/trace.json + docs/trace-waterfall.png.

    python scripts/capture_trace.py [--prompt TEXT] [--max-tokens 16] [-- extra `tandem serve` flags]

Starts `tandem serve` (1 prefill + 1 decode worker + the frontend, KV over UCX) with
OTEL_EXPORTER_OTLP_ENDPOINT pointing at an in-process OtlpCollector, sends a warm-up request (first
forwards pay one-time costs) and then the captured one, stops the system (every service flushes its
spans on shutdown), keeps the captured request's trace and renders it with trace_waterfall.py.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
for path in (REPO_ROOT, REPO_ROOT / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import grpc  # noqa: E402

from common.otlp_collector import CollectedSpan, OtlpCollector, save_spans  # noqa: E402
from common.tracing import Attr  # noqa: E402
from protos import generation_pb2 as g  # noqa: E402
from protos.generation_pb2_grpc import GenerationStub  # noqa: E402
from trace_waterfall import draw_waterfall  # noqa: E402

READY_TIMEOUT_SECONDS = 600.0
CAPTURED_REQUEST_ID = "traced-request"


def start_system(collector: OtlpCollector, log_dir: pathlib.Path, serve_argv: list[str]) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(OTEL_EXPORTER_OTLP_ENDPOINT=collector.endpoint, OTEL_BSP_SCHEDULE_DELAY="200")
    ready_file = log_dir / "ready.json"
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "serve", "--port", "0", "--http-port", "-1",
         "--log-dir", str(log_dir), "--ready-file", str(ready_file), *serve_argv],
        cwd=REPO_ROOT, env=env, start_new_session=True,
    )


def wait_ready(serve: subprocess.Popen, log_dir: pathlib.Path) -> str:
    """The frontend's host:port once `tandem serve` reports every service up."""
    ready_file = log_dir / "ready.json"
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not ready_file.exists():
        if serve.poll() is not None:
            raise RuntimeError(f"tandem serve exited with {serve.returncode}; logs in {log_dir}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"tandem serve not ready after {READY_TIMEOUT_SECONDS}s; logs in {log_dir}")
        time.sleep(0.5)
    return json.loads(ready_file.read_text())["frontend"]


def send(address: str, request_id: str, prompt: str, max_tokens: int) -> g.Final:
    request = g.GenerateRequest(
        request_id=request_id,
        chat=g.ChatMessages(messages=[g.ChatMessage(role="user", content=prompt)]),
        sampling=g.SamplingParams(max_tokens=max_tokens, temperature=0.0),
    )
    with grpc.insecure_channel(address) as channel:
        return list(GenerationStub(channel).Generate(request, timeout=300))[-1].final


def stop(serve: subprocess.Popen) -> None:
    """SIGTERM to the launcher (it stops its services, which flush their spans), SIGKILL if it hangs."""
    if serve.poll() is None:
        serve.send_signal(signal.SIGTERM)
    try:
        serve.wait(60)
    except subprocess.TimeoutExpired:
        serve.kill()
        serve.wait()


def request_trace(spans: list[CollectedSpan], request_id: str) -> list[CollectedSpan]:
    roots = [s for s in spans if not s.parent_span_id and s.attributes.get(Attr.REQUEST_ID) == request_id]
    if len(roots) != 1:
        raise RuntimeError(f"expected one root span for {request_id}, got {len(roots)} among {len(spans)} spans")
    return sorted((s for s in spans if s.trace_id == roots[0].trace_id), key=lambda s: s.start_ns)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", default="What is the capital of France?")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json-out", default=str(REPO_ROOT / "docs" / "results" / "trace.json"))
    parser.add_argument("--png-out", default=str(REPO_ROOT / "docs" / "trace-waterfall.png"))
    parser.add_argument("serve_argv", nargs="*", help="after --: flags for `tandem serve` (e.g. --model)")
    args = parser.parse_args(argv)
    if args.max_tokens < 2:
        parser.error("--max-tokens must be >= 2 (one token never reaches the decode worker)")
    with OtlpCollector() as collector, tempfile.TemporaryDirectory(prefix="tandem-trace-") as log_dir:
        serve = start_system(collector, pathlib.Path(log_dir), args.serve_argv)
        try:
            address = wait_ready(serve, pathlib.Path(log_dir))
            send(address, "warm-up", args.prompt, args.max_tokens)
            final = send(address, CAPTURED_REQUEST_ID, args.prompt, args.max_tokens)
        finally:
            stop(serve)
        spans = request_trace(collector.spans(), CAPTURED_REQUEST_ID)
    save_spans(spans, args.json_out)
    bars = draw_waterfall(spans, args.png_out, spans[0].trace_id)
    print(f"{final.usage.prompt_tokens} prompt + {final.usage.completion_tokens} completion tokens; "
          f"{len(spans)} spans from {sorted({s.service_name for s in spans})}")
    print(f"wrote {args.json_out} and {args.png_out} ({len(bars)} bars)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
