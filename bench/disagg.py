"""Disaggregated serving end to end, against the single-GPU engine on the same requests, in one command.

    # 1P1D: prefill on GPU 0, decode on GPU 1 (expected about 6 minutes on 2 H200s)
    python bench/disagg.py --prefill-device cuda:0 --decode-device cuda:1 --budget 540 --output disagg.json
    # P and D on one GPU: explicit KV pools (2 MiB a block for Llama-3-8B in bf16)
    python bench/disagg.py --device cuda:0 --prefill-args "--num-kv-blocks 8000" \\
        --decode-args "--num-kv-blocks 16000" --budget 540 --output disagg-1gpu.json
    # 1P2D: the second decode worker beside the prefill worker
    python bench/disagg.py --prefill-device cuda:0 --num-decode 2 --decode-device cuda:1,cuda:0 \\
        --prefill-args "--num-kv-blocks 8000" --decode-args "--num-kv-blocks 16000" --budget 540 --output d.json
    # CPU functional run
    python bench/disagg.py --device cpu --model dummy:tiny --num-requests 6 --max-input-len 40 \\
        --max-output-len 10 --rates 4 --requests-per-rate 6 --warmup-requests 2

Phases, in order (--phases picks some; the JSON is rewritten after each run, so a killed run keeps them):
    engine  `LLMEngine` alone on --baseline-device in a subprocess of its own (its memory is gone before
            the services start), through bench/sharegpt.py's runner: all N requests at once
    grpc    the services, all N at once over gRPC (`Generate` with token-id prompts)
    http    the services, all N at once over the OpenAI API (streamed /v1/completions, token-id prompts)
    rates   the services over gRPC at each of --rates requests/s (Poisson arrivals, seeded), the first
            --requests-per-rate requests
Before the first service phase: an OTLP collector (in this process), the client processes, the workers
and the frontend (`python -m services.cli prefill|decode|frontend`, free ports, logs in --log-dir), then
--warmup-requests through gRPC, which no figure counts.

Workload: bench/sharegpt.py's ShareGPT shape (token-id prompts, greedy, EOS ignored, max_tokens = each
request's output length). `--model dummy:<preset>` is served as random weights of that shape with a
--vocab-size vocabulary (default 49,152: the embedded SmolLM2 tokenizer's): the bench writes a model
folder (config.json + tokenizer files) and the workers, the frontend and the baseline all load it with
`--load-format dummy`, so the frontend detokenizes with a real tokenizer and checks ids against the
workers' vocabulary. --tokenizer synthetic writes a word-level tokenizer instead (no files needed).

The client: --client-processes processes (spawned once, reused by every run, each its own event loop,
uvloop where installed) take the requests of a run round-robin and start the run's arrival schedule at
one shared instant (`time.monotonic()`, one clock for every process on Linux); their timings are merged
here before any figure is computed (bench/_disagg_client.py).

Figures, per run, from the client:
    output tok/s  tokens received / wall time (the shared start -> last stream ended)
    TTFT          request sent -> first chunk carrying a token
    ITL           gap between consecutive chunks of one stream (vLLM's benchmark_serving)
    TPOT          (e2e - TTFT) / (output tokens - 1), per request
    gap1->2       token #1 -> token #2 (second_token_s - ttft_s): the hand-off and the first decode step
    client CPU    the busiest client process's CPU seconds / wall time (`bench_process_cpu_fraction`;
                  near 1.0 the client, not the services, may be what limits the run)
and from the services: `kv.send` spans (the prefill side of each hand-off) and `kv.recv` spans (the decode
side: pull posted -> KV in place): duration, GB/s = kv.bytes / duration / 1e9, kv.transport (the UCX
transport that carried the data); kv share = kv.send seconds / the request's time to its second token
(TTFT + gap1->2), i.e. how much of the wait for the first decoded token is the transfer itself; and
Triton compiles during the run from each worker's GetStats (`num_kernel_compiles_after_ready`; None where
the worker does not report it).

Modules: bench/_disagg_services.py (model folder, service processes), bench/_disagg_client.py (streams,
client processes), bench/_disagg_report.py (figures, table); this file: the command line and the phases.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The services are started with a preexec_fn (fork): grpc's fork handlers would only log that they skip.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
import grpc  # noqa: E402

from bench._common import write_json  # noqa: E402
from bench._disagg_client import ClientPool, RequestRecord, Target  # noqa: E402
from bench._disagg_report import (  # noqa: E402
    add_ratios, client_figures, kv_figures, merge_previous, new_report, table, wait_for_kv_spans)
from bench._disagg_services import (  # noqa: E402
    REPO_ROOT, Services, add_model_args, all_worker_stats, compile_counts, prepare_model,
    save_metrics, start_services, stats_dict, stopped_after)
from bench.sharegpt import sharegpt_workload, workload_summary  # noqa: E402
from common.otlp_collector import OtlpCollector, save_spans  # noqa: E402
from protos import generation_pb2, generation_pb2_grpc  # noqa: E402

PHASES = ("engine", "grpc", "http", "rates")
SHUTDOWN_RESERVE_SECONDS = 25.0  # of --budget, kept for stopping the services


def default_client_processes() -> int:
    """One client process per 4 CPU cores, 1 to 8."""
    return max(1, min(8, (os.cpu_count() or 1) // 4))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add_model_args(parser)
    add("--device", default=None, help="default for the three devices below (cuda:0, cpu, ...)")
    add("--prefill-device", default=None, help="default: --device, else cuda:0")
    add("--decode-device", default=None, help="one, or one per decode worker (comma separated); default: "
                                              "--device, else cuda:1")
    add("--baseline-device", default=None, help="the engine baseline's device; default: the prefill device")
    add("--baseline-step-at-a-time", action="store_true",
        help="also run the baseline with --no-enable-chunked-prefill (a step of prefill or of decode, never "
             "both), as the run engine-step-at-a-time")
    add("--baseline-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
        help=argparse.SUPPRESS)  # internal: the baseline child's --enable-chunked-prefill
    add("--num-decode", type=int, default=1, help="decode workers")
    add("--prefill-args", default="", help='extra flags for the prefill worker, e.g. "--num-kv-blocks 8000" '
                                           '(one flag alone: --prefill-args=--enforce-eager)')
    add("--decode-args", default="", help="extra flags for every decode worker")
    add("--frontend-args", default="", help="extra flags for the frontend")
    add("--max-num-seqs", type=int, default=256, help="workers and baseline")
    add("--max-num-batched-tokens", type=int, default=8192, help="workers and baseline")
    add("--num-requests", type=int, default=500)
    add("--max-input-len", type=int, default=1024, help="the workload's input clip")
    add("--max-output-len", type=int, default=512, help="the workload's output clip")
    add("--phases", default=",".join(PHASES), help=f"comma-separated subset of {PHASES}")
    add("--rates", default="4,8,16,24,32", help="requests/s of the rates phase (inf allowed)")
    add("--requests-per-rate", type=int, default=160, help="requests sent at each rate (at most N)")
    add("--warmup-requests", type=int, default=32, help="sent at once through the services before measuring")
    add("--seed", type=int, default=0, help="the rates' arrival times")
    add("--time-limit", type=float, default=150.0, help="seconds per run (then unfinished requests are cut)")
    add("--budget", type=float, default=0.0, help="seconds for the whole command: runs that no longer fit "
                                                  "are skipped (0 = no limit)")
    add("--start-timeout", type=float, default=300.0, help="seconds for the services to become ready")
    add("--span-wait", type=float, default=10.0, help="seconds to wait for a run's kv.send spans")
    add("--client-processes", type=int, default=default_client_processes(),
        help="client processes sending each run's requests (round-robin); default: CPU cores / 4, 1 to 8")
    add("--log-dir", default=None, help="service logs, ready files, model folder (default: a new temp folder)")
    add("--previous", default=None, help="JSON of an earlier run of the same workload: its runs are kept "
                                         "(e.g. the engine baseline when phases run in separate commands)")
    add("--output", default=None, help="write everything as JSON here")
    add("--baseline-output", default=None, help=argparse.SUPPRESS)  # internal: run only the baseline, here
    add("--load-format", default=None, help=argparse.SUPPRESS)  # internal: the baseline's model format
    args = parser.parse_args(argv)
    args.phases = [p for p in args.phases.split(",") if p]
    if any(p not in PHASES for p in args.phases):
        parser.error(f"--phases takes a subset of {PHASES}, got {args.phases}")
    args.rates = [float(r) for r in args.rates.split(",") if r]
    if args.client_processes < 1:
        parser.error(f"--client-processes must be >= 1, got {args.client_processes}")
    args.prefill_device = args.prefill_device or args.device or "cuda:0"
    decode_devices = (args.decode_device or args.device or "cuda:1").split(",")
    if len(decode_devices) not in (1, args.num_decode):
        parser.error(f"--decode-device: one device or {args.num_decode}, got {decode_devices}")
    args.decode_devices = decode_devices * args.num_decode if len(decode_devices) == 1 else decode_devices
    args.baseline_device = args.baseline_device or args.prefill_device
    args.dtype = args.dtype or ("float32" if args.prefill_device == "cpu" else "bfloat16")
    args.max_model_len = args.max_input_len + args.max_output_len
    return args


# ---- the engine baseline, in a subprocess -------------------------------------------------------


def baseline_child(args) -> int:
    """Internal mode: the engine alone on the workload, result to --baseline-output."""
    import torch

    from bench._common import environment, require_device
    from bench.sharegpt import free_device_memory, run_tandem
    from common.engine.config import EngineConfig
    from common.engine.llm_engine import LLMEngine

    device = require_device(args.baseline_device)
    config = EngineConfig(
        model=args.model, load_format=args.load_format or "auto", dtype=args.dtype, device=args.baseline_device,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
        max_model_len=args.max_model_len, kv_cache_memory_bytes=None if device.type == "cuda" else 1 << 28,
        enable_chunked_prefill=args.baseline_chunked_prefill,
    )
    engine = LLMEngine(config)
    prompts, output_lens = sharegpt_workload(args.num_requests, engine.model_config.vocab_size,
                                             args.max_input_len, args.max_output_len)
    result = run_tandem(engine, prompts, output_lens, args.time_limit)
    result.update(workload=workload_summary(prompts, output_lens), environment=environment(device),
                  device=args.baseline_device, num_kv_blocks=engine.allocator.num_blocks,
                  torch_threads=torch.get_num_threads(), enable_chunked_prefill=args.baseline_chunked_prefill)
    del engine
    free_device_memory(device)
    write_json(args.baseline_output, result)
    return 0


def run_baseline(args, model: dict, log_dir: Path, time_limit: float, chunked_prefill: bool = True) -> dict:
    """The engine baseline in a subprocess (so its GPU memory is gone before the services start);
    `chunked_prefill`: mixed steps (the engine's default) or a step of prefill or of decode."""
    output = log_dir / "engine-baseline.json"
    output.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--baseline-output", str(output),
               "--model", model["path"], "--load-format", model["load_format"], "--dtype", args.dtype,
               "--baseline-device", args.baseline_device, "--device", args.baseline_device,
               "--num-requests", str(args.num_requests), "--max-input-len", str(args.max_input_len),
               "--max-output-len", str(args.max_output_len), "--max-num-seqs", str(args.max_num_seqs),
               "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--time-limit", str(time_limit),
               "--baseline-chunked-prefill" if chunked_prefill else "--no-baseline-chunked-prefill"]
    log_path = log_dir / "engine-baseline.log"
    with open(log_path, "w") as log, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                                      env=dict(os.environ, PYTHONUNBUFFERED="1")) as child:
        try:
            code = child.wait(time_limit + args.start_timeout)
        except BaseException:  # a timeout, or SIGTERM from an outer one: never leave it holding the GPU
            child.kill()
            raise
    if code != 0 or not output.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"engine baseline exited with {code}; {log_path} ends with:\n{tail}")
    return json.loads(output.read_text())


# ---- one measured run over the services -------------------------------------------------------


@dataclass
class ServingSession:
    """What every measured run uses once the services are up."""

    services: Services
    target: Target
    collector: OtlpCollector  # receives the services' spans, in this process
    clients: ClientPool  # the processes that send the requests


def serving_run(name: str, api: str, rate: float, session: ServingSession, prompts: list[list[int]],
                output_lens: list[int], args, time_limit: float) -> dict:
    services, collector = session.services, session.collector
    records = [RequestRecord(f"{name}-{i}", len(p), n) for i, (p, n) in enumerate(zip(prompts, output_lens))]
    compiles_before = compile_counts(all_worker_stats(services))
    cpu_before = time.process_time()
    service_cpu_before = services.cpu_seconds()
    client_run = session.clients.run(api, session.target, records, prompts, rate, args.seed, time_limit)
    records, wall = client_run.records, client_run.wall_seconds
    parent_cpu_seconds = time.process_time() - cpu_before
    service_cpu_fractions = {name: None if seconds is None or service_cpu_before.get(name) is None or not wall
                             else (seconds - service_cpu_before[name]) / wall
                             for name, seconds in services.cpu_seconds().items()}
    services.check_alive()
    stats = all_worker_stats(services)
    compiles_after = compile_counts(stats)
    spans = wait_for_kv_spans(collector, records, args.span_wait)
    save_spans(spans, services.log_dir / f"spans-{name}.json")  # for scripts/trace_waterfall.py
    collector.clear()
    compiles = {k: None if v is None or compiles_before[k] is None else v - compiles_before[k]
                for k, v in compiles_after.items()}
    known = [v for v in compiles.values() if v is not None]
    return {
        "name": name, "api": api, "rate": rate if rate != float("inf") else "inf", **client_figures(records, wall),
        "truncated": any(r.end is None for r in records), "kv": kv_figures(spans, records),
        "compiles": compiles, "compiles_total": sum(known) if known else None, "compiles_after_ready": compiles_after,
        # the busiest client process's CPU / wall (with one process: the client's, as before the split)
        "bench_process_cpu_fraction": max(client_run.cpu_fractions) if wall else None,
        "client_cpu_fractions": client_run.cpu_fractions, "num_client_processes": len(client_run.cpu_fractions),
        "client_event_loop": client_run.event_loop,
        # this process: the OTLP collector receiving the services' spans, and the wait for the clients
        "parent_process_cpu_fraction": parent_cpu_seconds / wall if wall else None,
        # each service process's CPU time (all threads) / wall: 1.0 = one core busy the whole run
        "service_cpu_fractions": service_cpu_fractions,
        "worker_stats": {worker: stats_dict(values) for worker, values in stats.items()},
        "requests": [r.summary(client_run.start_at) for r in records],
    }


def warm_up(session: ServingSession, args, vocab_size: int, phases: list[str]) -> dict:
    """--warmup-requests at once over gRPC (and 2 over HTTP when measured), from another seed's workload."""
    prompts, output_lens = sharegpt_workload(args.warmup_requests, vocab_size, args.max_input_len,
                                             args.max_output_len, seed=1)
    result = {}
    for api, count in (("grpc", args.warmup_requests), ("http", 2 if "http" in phases else 0)):
        if count == 0:
            continue
        records = [RequestRecord(f"warmup-{api}-{i}", len(p), n)
                   for i, (p, n) in enumerate(zip(prompts[:count], output_lens[:count]))]
        client_run = session.clients.run(api, session.target, records, prompts[:count], float("inf"), 0,
                                         args.time_limit)
        records = client_run.records
        result[api] = {"num_requests": count, "num_errors": sum(not r.is_complete for r in records),
                       "wall_seconds": client_run.wall_seconds,
                       "errors": list(dict.fromkeys(r.error for r in records if r.error))[:3]}
    return result


class Clock:
    """Seconds left of --budget (inf without one), less what stopping the services needs."""

    def __init__(self, budget: float):
        self.end = time.monotonic() + budget if budget > 0 else float("inf")

    def limit(self, wanted: float, reserve: float = SHUTDOWN_RESERVE_SECONDS) -> float:
        return min(wanted, self.end - reserve - time.monotonic())


def serving_plan(args, prompts, output_lens) -> list[tuple[str, str, float, list, list]]:
    """(name, api, rate, prompts, output_lens) of each measured run, in order."""
    plan = []
    if "grpc" in args.phases:
        plan.append(("grpc-inf", "grpc", float("inf"), prompts, output_lens))
    if "http" in args.phases:
        plan.append(("http-inf", "http", float("inf"), prompts, output_lens))
    if "rates" in args.phases:
        count = min(args.requests_per_rate, len(prompts))
        for rate in args.rates:
            plan.append((f"grpc-rate-{rate:g}", "grpc", rate, prompts[:count], output_lens[:count]))
    return plan


def open_session(args, model: dict, report: dict, services: Services, collector: OtlpCollector,
                 clients: ClientPool) -> ServingSession:
    """Starts the services, asks the frontend what it serves, and warms everything up."""
    frontend = start_services(args, model, services)
    report["services"] = {s.name: {"device": s.device, "log": str(s.log_path), **s.info} for s in services.started}
    with grpc.insecure_channel(frontend.address) as channel:
        info = generation_pb2_grpc.GenerationStub(channel).GetModelInfo(generation_pb2.GetModelInfoRequest(),
                                                                        timeout=30)
    session = ServingSession(services, Target(frontend.address, frontend.info["http_port"], info.model_name),
                             collector, clients)
    print(f"services ready ({info.model_name}, vocab {info.vocab_size}); warming up with "
          f"{clients.num_processes} client processes", flush=True)
    report["warmup"] = warm_up(session, args, model["vocab_size"], args.phases)
    services.check_alive()
    report["compiles_after_warmup"] = compile_counts(all_worker_stats(services))
    collector.clear()
    return session


def run_services(args, model: dict, report: dict, log_dir: Path, prompts, output_lens, clock: Clock) -> None:
    plan = serving_plan(args, prompts, output_lens)
    if not plan:
        return
    # The client processes start first: they load their imports while the workers load the model.
    with OtlpCollector() as collector, ClientPool(args.client_processes) as clients:
        services = Services(log_dir, collector.endpoint)
        with stopped_after(services, report):
            session = open_session(args, model, report, services, collector, clients)
            for name, api, rate, run_prompts, run_lens in plan:
                limit = clock.limit(args.time_limit)
                if limit < 10:
                    report["skipped"].append(name)
                    print(f"{name}: skipped, {limit:.0f} s left of --budget", flush=True)
                    continue
                run = serving_run(name, api, rate, session, run_prompts, run_lens, args, limit)
                report["runs"][name] = run
                print(f"{name}: {run['output_tokens_per_s']:.1f} tok/s, {run['num_errors']} errors, "
                      f"kv.send {run['kv']['num_sends']} ({run['kv']['transports']}), busiest client process "
                      f"{run['bench_process_cpu_fraction'] or 0:.0%} CPU ({run['client_event_loop']})", flush=True)
                add_ratios(report)
                write_json(args.output, report)
            report["phases_done"] += [p for p in args.phases if p != "engine"]
            report["metrics_files"] = save_metrics(services)


def run_engine_phase(args, model: dict, report: dict, log_dir: Path, clock: Clock) -> None:
    print(f"engine baseline on {args.baseline_device} (log {log_dir / 'engine-baseline.log'})", flush=True)
    try:
        report["runs"]["engine"] = run_baseline(args, model, log_dir, max(10.0, clock.limit(args.time_limit, 0)))
        report["phases_done"].append("engine")
        print(f"engine: {report['runs']['engine']['useful_output_tokens_per_s']:.1f} tok/s", flush=True)
        if args.baseline_step_at_a_time:
            run = run_baseline(args, model, log_dir, max(10.0, clock.limit(args.time_limit, 0)), chunked_prefill=False)
            report["runs"]["engine-step-at-a-time"] = run
            print(f"engine, step at a time: {run['useful_output_tokens_per_s']:.1f} tok/s", flush=True)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        report["failure"] = f"engine baseline: {exc}"
        print(exc, flush=True)
    write_json(args.output, report)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.baseline_output:
        return baseline_child(args)
    clock = Clock(args.budget)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one socket per HTTP request in flight
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    signal.signal(signal.SIGTERM, _interrupt)  # an outer timeout: stop the services, keep what was measured
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tandem-bench-disagg-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args, log_dir / "model")
    prompts, output_lens = sharegpt_workload(args.num_requests, model["vocab_size"], args.max_input_len,
                                             args.max_output_len)
    report = new_report(args, model, prompts, output_lens)
    report["log_dir"] = str(log_dir)
    if args.previous:
        merge_previous(report, args.previous)
    try:
        if "engine" in args.phases:
            run_engine_phase(args, model, report, log_dir, clock)
        run_services(args, model, report, log_dir, prompts, output_lens, clock)
    except KeyboardInterrupt:
        report["failure"] = report["failure"] or "interrupted (SIGINT/SIGTERM)"
    add_ratios(report)
    report["table"] = table(report)
    write_json(args.output, report)
    transports = sorted({t for run in report["runs"].values()
                         for side in run.get("kv", {}).get("transports", {}).values() for t in side})
    print(f"logs: {log_dir}; KV transports seen: {', '.join(transports) or 'none'}")
    print(report["table"])
    return 1 if report["failure"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
