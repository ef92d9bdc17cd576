"""Where disaggregation pays: 1P1D against colocated workers over a QPS sweep, with and without bursts of
long prompts; goodput at SLO (DistServe) and ITL p99 under bursts.

Topologies (--topologies, each started from scratch, measured, stopped):
    1p1d        a prefill worker on --gpu-a, a decode worker on --gpu-b (every prompt handed off)
    1p1d-local  the same, with --max-local-prefill-length: short prompts prefilled on the decode worker
    2colocated  one colocated worker (`tandem worker`) per GPU, the frontend spreading requests
    1colocated  one colocated worker on --gpu-a
Workloads (bench/_payoff_figures.py): sharegpt (bench/sharegpt.py's shape) and bursts (the same requests,
30% of them with 4,096-token prompts arriving 8 at a time). Every (topology, workload, rate) is one run of
--requests-per-rate requests over gRPC, timed by the client processes of bench/disagg.py's harness.

    # 2xH200, one command per topology (each fits a 10-minute call), merged through --previous:
    python bench/payoff.py --topologies 1p1d --budget 540 --output payoff.json
    python bench/payoff.py --topologies 2colocated --budget 540 --previous payoff.json --output payoff.json
    python bench/payoff.py --topologies 1colocated --single-gpu-check --budget 540 --previous payoff.json \
        --output payoff.json
    python bench/payoff.py --topologies 1p1d-local --budget 540 --previous payoff.json --output payoff.json
    # CPU functional run
    python bench/payoff.py --device cpu --model dummy:tiny --num-requests 6 --max-input-len 40 \\
        --max-output-len 8 --burst-prompt-len 64 --rates 2 --warmup-requests 1

The JSON is rewritten after each run (a killed command keeps what it measured); the table, printed last,
is rebuilt from every run, merged ones included.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The services are started with a preexec_fn (fork): grpc's fork handlers would only log that they skip.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from bench._common import write_json  # noqa: E402
from bench._disagg_client import ClientPool, RequestRecord, Target  # noqa: E402
from bench._disagg_report import client_figures  # noqa: E402
from bench._disagg_services import (  # noqa: E402
    Services, add_model_args, all_worker_stats, engine_argv, prepare_model, stopped_after)
from bench._payoff_figures import (  # noqa: E402
    TOPOLOGIES, WORKLOADS, burst_offsets, burst_workload, run_key, slo_figures, summarize, table)
from bench.disagg import SHUTDOWN_RESERVE_SECONDS, Clock, default_client_processes  # noqa: E402
from bench.sharegpt import sharegpt_workload, workload_summary  # noqa: E402
from common.otlp_collector import OtlpCollector  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add_model_args(parser)
    add("--device", default=None, help="every worker's device (cpu for a functional run); default: GPUs a and b")
    add("--gpu-a", default="cuda:0", help="prefill worker, the first colocated worker")
    add("--gpu-b", default="cuda:1", help="decode worker, the second colocated worker")
    add("--topologies", default=",".join(TOPOLOGIES[:1] + TOPOLOGIES[2:]), help=f"subset of {TOPOLOGIES}")
    add("--workloads", default=",".join(WORKLOADS), help=f"subset of {WORKLOADS}")
    add("--max-local-prefill-length", type=int, default=512, help="1p1d-local: the frontend's threshold")
    add("--worker-args", default="", help="extra flags for every worker")
    add("--max-num-seqs", type=int, default=256)
    add("--max-num-batched-tokens", type=int, default=8192)
    add("--num-requests", type=int, default=200, help="requests of each run (the first of the workload)")
    add("--max-input-len", type=int, default=1024, help="ShareGPT input clip")
    add("--max-output-len", type=int, default=512, help="ShareGPT output clip")
    add("--burst-fraction", type=float, default=0.3, help="bursts: share of requests with a long prompt")
    add("--burst-prompt-len", type=int, default=4096, help="bursts: tokens of each long prompt")
    add("--burst-size", type=int, default=8, help="bursts: long prompts sent at one instant")
    add("--rates", default="2,4,8,12,16", help="requests/s of the sweep")
    add("--ttft-slo", type=float, default=1.0, help="seconds, at p99")
    add("--itl-slo", type=float, default=50.0, help="milliseconds, at p99")
    add("--warmup-requests", type=int, default=16)
    add("--seed", type=int, default=0)
    add("--time-limit", type=float, default=120.0, help="seconds per run (then unfinished requests are cut)")
    add("--budget", type=float, default=0.0, help="seconds for the whole command (0 = no limit)")
    add("--start-timeout", type=float, default=300.0)
    add("--client-processes", type=int, default=default_client_processes())
    add("--log-dir", default=None)
    add("--single-gpu-check", action="store_true",
        help="also LLMEngine alone on --gpu-a (before any service starts), then 1colocated at saturation and at "
             "80%% of it: serving throughput against offline, and TTFT p50 under load")
    add("--previous", default=None, help="JSON of an earlier command of the same workload: its runs are kept")
    add("--output", default=None)
    args = parser.parse_args(argv)
    args.topologies = [t for t in args.topologies.split(",") if t]
    args.workloads = [w for w in args.workloads.split(",") if w]
    args.rates = [float(r) for r in args.rates.split(",") if r]
    if not args.topologies or any(t not in TOPOLOGIES for t in args.topologies):
        parser.error(f"--topologies takes a subset of {TOPOLOGIES}, got {args.topologies}")
    if not args.workloads or any(w not in WORKLOADS for w in args.workloads):
        parser.error(f"--workloads takes a subset of {WORKLOADS}, got {args.workloads}")
    if any(not 0 < r < float("inf") for r in args.rates):
        parser.error(f"--rates must be finite and > 0, got {args.rates}")
    if not 0 <= args.burst_fraction <= 1 or args.burst_size < 1 or args.burst_prompt_len < 1:
        parser.error("--burst-fraction in [0, 1], --burst-size and --burst-prompt-len >= 1")
    args.gpu_a, args.gpu_b = (args.device, args.device) if args.device else (args.gpu_a, args.gpu_b)
    args.dtype = args.dtype or ("float32" if args.gpu_a == "cpu" else "bfloat16")
    args.max_model_len = max(args.max_input_len, args.burst_prompt_len) + args.max_output_len
    return args


def topology_services(topology: str, args) -> tuple[list[tuple[str, str, str]], list[str]]:
    """([(name, role, device)] of its workers, extra frontend flags)."""
    if topology.startswith("1p1d"):
        frontend = ["--max-local-prefill-length", str(args.max_local_prefill_length)] if topology == "1p1d-local" else []
        return [("prefill-0", "prefill", args.gpu_a), ("decode-0", "decode", args.gpu_b)], frontend
    devices = [args.gpu_a, args.gpu_b] if topology == "2colocated" else [args.gpu_a]
    return [(f"worker-{i}", "worker", device) for i, device in enumerate(devices)], []


def start_topology(topology: str, args, model: dict, services: Services):
    """Its workers (on different GPUs at once), then the frontend; returns the frontend once ready."""
    workers, frontend_args = topology_services(topology, args)
    extra = shlex.split(args.worker_args)
    started = [services.start(name, role, device, engine_argv(args, model, device) + extra)
               for name, role, device in workers]
    services.wait_ready(started, args.start_timeout)
    prefill = [s.address for s in started if s.role == "prefill"]
    decode_side = [s.address for s in started if s.role != "prefill"]
    frontend = services.start("frontend", "frontend", None, [
        "--model", model["path"], "--load-format", model["load_format"], "--http-port", "-1",
        *(["--prefill-addresses", ",".join(prefill)] if prefill else []),
        "--decode-addresses", ",".join(decode_side), *frontend_args])
    services.wait_ready([frontend], args.start_timeout)
    return frontend, len({device for _, _, device in workers})


def _num_transfers(services: Services) -> int:
    return sum(stats.num_transfers for name, stats in all_worker_stats(services).items() if name.startswith("decode"))


def measured_run(key: str, clients: ClientPool, target: Target, services: Services, workload: dict, rate: float,
                 args, time_limit: float) -> dict:
    prompts, output_lens = workload["prompts"], workload["output_lens"]
    records = [RequestRecord(f"{key.replace('/', '-')}-{i}", len(p), n) for i, (p, n) in enumerate(zip(prompts, output_lens))]
    offsets = burst_offsets(len(prompts), rate, args.seed, workload["long_indices"], args.burst_size)
    transfers_before = _num_transfers(services)
    client_run = clients.run("grpc", target, records, prompts, rate, args.seed, time_limit, offsets=offsets)
    services.check_alive()
    figures = client_figures(client_run.records, client_run.wall_seconds)
    return {"rate": rate, **figures, **slo_figures(client_run.records, figures, args.ttft_slo, args.itl_slo),
            "num_hand_offs": _num_transfers(services) - transfers_before,
            "truncated": any(r.end is None for r in client_run.records),
            "requests": [r.summary(client_run.start_at) for r in client_run.records]}


def warm_up(clients: ClientPool, target: Target, args, vocab_size: int) -> int:
    """--warmup-requests ShareGPT requests and two long prompts at once, from another seed; returns errors."""
    prompts, output_lens = sharegpt_workload(args.warmup_requests, vocab_size, args.max_input_len,
                                             args.max_output_len, seed=1)
    prompts += [[7] * args.burst_prompt_len] * 2
    output_lens += [4, 4]
    records = [RequestRecord(f"warmup-{i}", len(p), n) for i, (p, n) in enumerate(zip(prompts, output_lens))]
    run = clients.run("grpc", target, records, prompts, float("inf"), 0, args.time_limit)
    return sum(not r.is_complete for r in run.records)


def run_topology(topology: str, args, model: dict, workloads: dict, report: dict, log_dir: Path, clock: Clock,
                 clients: ClientPool, collector: OtlpCollector) -> None:
    services = Services(log_dir / topology, collector.endpoint)
    services.log_dir.mkdir(parents=True, exist_ok=True)
    with stopped_after(services, report, topology):
        frontend, num_gpus = start_topology(topology, args, model, services)
        target = Target(frontend.address, 0, "")
        print(f"{topology}: ready; warm-up errors: {warm_up(clients, target, args, model['vocab_size'])}", flush=True)
        for workload_name in args.workloads:
            for rate in args.rates:
                key = run_key(topology, workload_name, rate)
                limit = clock.limit(args.time_limit)
                if limit < 10:
                    report["skipped"].append(key)
                    continue
                run = measured_run(key, clients, target, services, workloads[workload_name], rate, args, limit)
                run["num_gpus"] = num_gpus
                report["runs"][key] = run
                collector.clear()
                print(f"{key}: {run['output_tokens_per_s']:.1f} tok/s, TTFT p99 {run['ttft_ms']['p99'] or 0:.0f} ms, "
                      f"ITL p99 {run['itl_ms']['p99'] or 0:.1f} ms, SLO {'met' if run['meets_slo'] else 'missed'}, "
                      f"{run['num_hand_offs']} hand-offs, {run['num_errors']} errors", flush=True)
                report["summary"] = summarize(report)
                write_json(args.output, report)
        if topology == "1colocated" and args.single_gpu_check and "engine" in report["single_gpu"]:
            single_gpu_runs(clients, target, services, workloads["sharegpt"], args, clock, report["single_gpu"])
            write_json(args.output, report)
        report["topologies_done"].append(topology)


def engine_baseline(args, model: dict, log_dir: Path, clock: Clock) -> dict:
    """`LLMEngine` alone on --gpu-a on the ShareGPT requests, all at once (bench/disagg.py's baseline, in a
    subprocess whose GPU memory is gone before the services start)."""
    from bench.disagg import run_baseline

    baseline_args = argparse.Namespace(**{**vars(args), "baseline_device": args.gpu_a})
    baseline_args.max_model_len = args.max_input_len + args.max_output_len
    result = run_baseline(baseline_args, model, log_dir, max(10.0, clock.limit(args.time_limit, 0)))
    return {"output_tokens_per_s": result["useful_output_tokens_per_s"], "truncated": result.get("truncated")}


def single_gpu_runs(clients: ClientPool, target: Target, services: Services, workload: dict, args, clock: Clock,
                    single_gpu: dict) -> None:
    """One colocated worker on all the ShareGPT requests at once (saturation), then at 80% of the request
    rate it reached: its throughput against the engine's, and its TTFT p50 under that load."""
    saturation = measured_run("1colocated/sharegpt/saturation", clients, target, services, workload, float("inf"),
                              args, clock.limit(args.time_limit))
    load_rate = 0.8 * saturation["requests_per_s"]
    loaded = measured_run("1colocated/sharegpt/load-80", clients, target, services, workload, load_rate, args,
                          clock.limit(args.time_limit))
    engine = single_gpu["engine"]["output_tokens_per_s"]
    single_gpu.update(
        saturation={k: saturation[k] for k in ("output_tokens_per_s", "requests_per_s", "ttft_ms", "num_errors")},
        load_80={k: loaded[k] for k in ("rate", "output_tokens_per_s", "ttft_ms", "itl_ms", "num_errors")},
        throughput_vs_engine=saturation["output_tokens_per_s"] / engine if engine else None)
    print(f"single GPU: {single_gpu['throughput_vs_engine'] or 0:.2f}x the engine's tok/s at saturation; TTFT p50 "
          f"{loaded['ttft_ms']['p50'] or 0:.0f} ms at {load_rate:.2f} req/s (80%)", flush=True)


def build_workloads(args, vocab_size: int) -> dict:
    prompts, output_lens = sharegpt_workload(args.num_requests, vocab_size, args.max_input_len, args.max_output_len)
    long_prompts, long_lens, long_indices = burst_workload(prompts, output_lens, vocab_size, args.burst_fraction,
                                                           args.burst_prompt_len, args.seed)
    return {"sharegpt": {"prompts": prompts, "output_lens": output_lens, "long_indices": []},
            "bursts": {"prompts": long_prompts, "output_lens": long_lens, "long_indices": long_indices}}


def new_report(args, model: dict, workloads: dict) -> dict:
    return {
        "settings": {k: v for k, v in vars(args).items()}, "model": model, "dtype": args.dtype,
        "workloads": {name: {**workload_summary(w["prompts"], w["output_lens"]), "num_long": len(w["long_indices"])}
                      for name, w in workloads.items()},
        "slo": {"ttft_s": args.ttft_slo, "itl_ms": args.itl_slo, "burst_fraction": args.burst_fraction,
                "burst_prompt_len": args.burst_prompt_len, "burst_size": args.burst_size},
        "runs": {}, "summary": {}, "single_gpu": {}, "topologies_done": [], "skipped": [], "failure": None,
    }


def merge_previous(report: dict, path: str) -> None:
    import json

    previous = json.loads(Path(path).read_text())
    if previous.get("workloads") != report["workloads"] or previous.get("slo") != report["slo"]:
        raise SystemExit(f"--previous {path}: a different workload or SLO, not merging")
    for key, run in previous.get("runs", {}).items():
        report["runs"].setdefault(key, run)
    report["single_gpu"].update(previous.get("single_gpu", {}))
    report["topologies_done"] += [t for t in previous.get("topologies_done", []) if t not in report["topologies_done"]]


def main(argv=None) -> int:
    args = parse_args(argv)
    clock = Clock(args.budget)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tandem-bench-payoff-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args, log_dir / "model")
    workloads = build_workloads(args, model["vocab_size"])
    report = new_report(args, model, workloads)
    if args.previous:
        merge_previous(report, args.previous)
    started = time.monotonic()
    try:
        if args.single_gpu_check:
            try:
                report["single_gpu"]["engine"] = engine_baseline(args, model, log_dir, clock)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                report["failure"] = f"engine baseline: {exc}"
            write_json(args.output, report)
        with OtlpCollector() as collector, ClientPool(args.client_processes) as clients:
            for topology in args.topologies:
                if clock.limit(args.time_limit) < SHUTDOWN_RESERVE_SECONDS:
                    report["skipped"].append(topology)
                    continue
                run_topology(topology, args, model, workloads, report, log_dir, clock, clients, collector)
    except KeyboardInterrupt:
        report["failure"] = report["failure"] or "interrupted (SIGINT/SIGTERM)"
    report["summary"] = summarize(report)
    report["table"] = table(report)
    report["wall_seconds"] = time.monotonic() - started
    write_json(args.output, report)
    print(f"logs: {log_dir}")
    print(report["table"])
    return 1 if report["failure"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
