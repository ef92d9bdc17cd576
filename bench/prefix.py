"""Prefix caching and cache-aware routing on multi-turn chat, through the services, in one command.

    # 2 prefill workers sharing GPU 0 (a memory share each) + 1 decode worker on GPU 1, about 8 minutes.
    # Each prefill pool holds 120k tokens, about half of the 235k distinct tokens of the 200 conversations
    # (most of them live at once): a worker that sees every conversation (round-robin) must evict live
    # history, one that sees half of them (cache-aware) need not.
    python bench/prefix.py --prefill-device cuda:0,cuda:0 --decode-device cuda:1 \\
        --prefill-args "--gpu-memory-utilization 0.42 --max-num-kv-tokens 120000" \\
        --budget 570 --output prefix.json
    # CPU functional run
    python bench/prefix.py --device cpu --model dummy:tiny --num-conversations 4 --num-turns 3 \\
        --system-prompt-len 64 --max-user-len 24 --max-answer-len 6 --warmup-requests 1

Configurations (--configs picks some), each on freshly started services (empty caches):
    off-rr   workers --no-enable-prefix-caching, frontend --router-mode round-robin
    on-rr    prefix caching on (the default), frontend --router-mode round-robin
    on-kv    prefix caching on, frontend --router-mode kv (cache-aware, the frontend's default)

Workload (bench/_chat_workload.py): --num-conversations conversations of --num-turns turns sharing a
--system-prompt-len-token system prompt; ShareGPT-shaped user turns and answer lengths; each turn's
prompt is the whole conversation so far (the answers as the server streamed them), sent once the
previous answer has returned; conversations start at Poisson arrivals of --rate per second.

Figures per configuration:
    TTFT p50/p99       request sent -> first token at the client, all turns and turns after the first
    prompt tokens      sum of every turn's prompt, as sent
    prefill computed   prompt tokens - prefix-cache hits on the prefill workers (GetStats delta over
                       the run; the engine computes at least each prompt's last token)
    hit rate           prefix-cache hits / prompt tokens (prefill workers)
    KV bytes           moved prefill -> decode: the decode workers' num_transfer_bytes delta, and per turn
                       from the kv.send spans (later turns = every turn after the first)
The table is printed last; --output gets the JSON (rewritten after each configuration).
Services, client processes, spans: bench/_disagg_services.py, _disagg_client.py, _disagg_report.py.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")  # services start with a preexec_fn (fork)

from bench._chat_workload import ChatWorkload, chat_workload, split_jobs  # noqa: E402
from bench._common import format_table, percentiles, write_json  # noqa: E402
from bench._disagg_client import ClientPool, RequestRecord, send_grpc  # noqa: E402
from bench._disagg_report import kv_bytes_by_request, wait_for_kv_spans  # noqa: E402
from bench._disagg_services import (  # noqa: E402
    ServiceFailure, Services, add_model_args, all_worker_stats, prepare_model, save_service_logs_tail,
    start_services)
from common.otlp_collector import OtlpCollector  # noqa: E402

CONFIGS = {  # name: (extra prefill/decode worker flags, frontend flags)
    "off-rr": (["--no-enable-prefix-caching"], ["--router-mode", "round-robin"]),
    "on-rr": ([], ["--router-mode", "round-robin"]),
    "on-kv": ([], ["--router-mode", "kv"]),
}
SHUTDOWN_RESERVE_SECONDS = 25.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add_model_args(parser)
    add("--device", default=None, help="default for the devices below (cuda:0, cpu, ...)")
    add("--prefill-device", default=None, help="one per prefill worker (comma separated), or one for all; "
                                               "default: --device, else cuda:0")
    add("--decode-device", default=None, help="one per decode worker, or one for all; default: --device, else cuda:1")
    add("--num-prefill", type=int, default=2, help="prefill workers")
    add("--num-decode", type=int, default=1, help="decode workers")
    add("--prefill-args", default="", help="extra flags for every prefill worker")
    add("--decode-args", default="", help="extra flags for every decode worker")
    add("--frontend-args", default="", help="extra flags for the frontend")
    add("--max-num-seqs", type=int, default=256)
    add("--max-num-batched-tokens", type=int, default=8192)
    add("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {list(CONFIGS)}")
    add("--num-conversations", type=int, default=200)
    add("--num-turns", type=int, default=4)
    add("--system-prompt-len", type=int, default=1000)
    add("--max-user-len", type=int, default=512, help="a user turn's length clip")
    add("--max-answer-len", type=int, default=256, help="an answer's length clip")
    add("--rate", type=float, default=16.0, help="conversations started per second (Poisson; inf = all at once)")
    add("--seed", type=int, default=0)
    add("--warmup-requests", type=int, default=8, help="unrelated prompts sent before each measured run")
    add("--client-processes", type=int, default=max(1, min(4, (os.cpu_count() or 1) // 8)))
    add("--time-limit", type=float, default=150.0, help="seconds per configuration's run")
    add("--budget", type=float, default=0.0, help="seconds for the whole command (0 = no limit)")
    add("--start-timeout", type=float, default=300.0)
    add("--span-wait", type=float, default=10.0, help="seconds to wait for a run's kv.send spans")
    add("--log-dir", default=None)
    add("--output", default=None)
    args = parser.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c]
    if any(c not in CONFIGS for c in args.configs):
        parser.error(f"--configs takes a subset of {list(CONFIGS)}, got {args.configs}")
    for name in ("num_prefill", "num_decode", "num_conversations", "num_turns", "client_processes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    args.prefill_devices = _devices(parser, "--prefill-device", args.prefill_device or args.device or "cuda:0",
                                    args.num_prefill)
    args.decode_devices = _devices(parser, "--decode-device", args.decode_device or args.device or "cuda:1",
                                   args.num_decode)
    args.prefill_device = args.prefill_devices[0]
    args.dtype = args.dtype or ("float32" if args.prefill_device == "cpu" else "bfloat16")
    return args


def _devices(parser, flag: str, text: str, count: int) -> list[str]:
    devices = text.split(",")
    if len(devices) not in (1, count):
        parser.error(f"{flag}: one device or {count}, got {devices}")
    return devices * count if len(devices) == 1 else devices


# ---- one configuration ----------------------------------------------------------------------------


def _prefix_totals(stats: dict) -> dict[str, int]:
    prefill = [s for name, s in stats.items() if name.startswith("prefill")]
    decode = [s for name, s in stats.items() if name.startswith("decode")]
    return {"queries": sum(s.prefix_cache_queries_tokens for s in prefill),
            "hits": sum(s.prefix_cache_hits_tokens for s in prefill),
            "kv_bytes": sum(s.num_transfer_bytes for s in decode),
            "hits_by_worker": {name: s.prefix_cache_hits_tokens for name, s in stats.items()}}


def router_counts(frontend) -> dict[str, float]:
    """The frontend's router counters (services/frontend/router_metrics.py), summed over labels."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    port = frontend.info.get("metrics_port")
    if port is None:
        return {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    counts = {}
    for family in text_string_to_metric_families(text):
        if family.name.startswith("tandem:router_"):
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    key = f"{sample.name.removeprefix('tandem:')}:{sample.labels.get('worker_role', '')}"
                    counts[key] = counts.get(key, 0) + sample.value
    return counts


def warm_up(address: str, vocab_size: int, args) -> None:
    """--warmup-requests unrelated prompts (their blocks never match the workload's)."""
    import asyncio

    import grpc
    import numpy as np

    from protos import generation_pb2_grpc

    rng = np.random.default_rng(args.seed + 1)

    async def run() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            records = [RequestRecord(f"warmup-{i}", 0, 4) for i in range(args.warmup_requests)]
            prompts = [rng.integers(3, vocab_size, size=args.system_prompt_len // 2 + 8).tolist() for _ in records]
            await asyncio.gather(*(send_grpc(stub, r, p) for r, p in zip(records, prompts)))
            failed = [r.error for r in records if not r.is_complete]
            if failed:
                raise RuntimeError(f"warm-up failed: {failed[0]}")

    if args.warmup_requests:
        asyncio.run(run())


def turn_figures(turns, kv_bytes: dict[str, int]) -> dict:
    """TTFT and KV bytes of a set of turns (TurnRecords)."""
    sent = [t.record for t in turns if t.record.chunk_times]
    return {"num_turns": len(turns), "ttft_ms": {k: None if v is None else v * 1e3 for k, v in
                                                 percentiles([r.chunk_times[0] - r.sent for r in sent]).items()},
            "prompt_tokens": sum(t.record.num_prompt_tokens for t in turns),
            "kv_bytes": sum(kv_bytes.get(t.record.request_id, 0) for t in turns)}


def measure(name: str, workload: ChatWorkload, model: dict, args, log_dir: Path, clients: ClientPool,
            time_limit: float) -> dict:
    """One configuration on fresh services: start, warm up, play the workload, read the figures."""
    worker_flags, frontend_flags = CONFIGS[name]
    run_args = argparse.Namespace(**vars(args))
    run_args.prefill_args = " ".join([args.prefill_args, *worker_flags])
    run_args.decode_args = " ".join([args.decode_args, *worker_flags])
    run_args.frontend_args = " ".join([args.frontend_args, *frontend_flags])
    run_dir = log_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    with OtlpCollector() as collector:
        services = Services(run_dir, collector.endpoint)
        try:
            frontend = start_services(run_args, model, services)
            warm_up(frontend.address, model["vocab_size"], args)
            before = _prefix_totals(all_worker_stats(services))
            collector.clear()
            jobs = split_jobs(name, frontend.address, workload, clients.num_processes, time_limit)
            start_at, results = clients.run_jobs(jobs, time_limit)
            services.check_alive()
            time.sleep(0.5)  # the workers' stats refresh after their last step
            after = _prefix_totals(all_worker_stats(services))
            turns = [t for result in results for t in result.turns]
            records = [t.record for t in turns]
            spans = wait_for_kv_spans(collector, records, args.span_wait)
            kv_bytes = kv_bytes_by_request(spans, {r.request_id for r in records})
            wall = max(r.ended_at for r in results) - start_at
            router = router_counts(frontend)
        finally:
            services.stop()
            report: dict = {}
            save_service_logs_tail(services, report)
    hits, queries = after["hits"] - before["hits"], after["queries"] - before["queries"]
    prompt_tokens = sum(r.num_prompt_tokens for r in records)
    errors = [r for r in records if not r.is_complete]
    return {
        "name": name, "worker_flags": worker_flags, "frontend_flags": frontend_flags, "wall_seconds": wall,
        "num_turns": len(records), "num_completed": len(records) - len(errors), "num_errors": len(errors),
        "error_messages": list(dict.fromkeys(r.error for r in errors))[:5],
        "all_turns": turn_figures(turns, kv_bytes),
        "later_turns": turn_figures([t for t in turns if t.turn > 0], kv_bytes),
        "prompt_tokens": prompt_tokens, "prefix_cache_queries_tokens": queries, "prefix_cache_hits_tokens": hits,
        "prefill_tokens_computed": prompt_tokens - hits, "hit_rate": hits / prompt_tokens if prompt_tokens else None,
        "hits_by_worker": {k: v - before["hits_by_worker"].get(k, 0) for k, v in after["hits_by_worker"].items()},
        "router": router,  # prompt tokens routed and those the chosen worker was believed to hold (kv mode)
        "kv_bytes_transferred": after["kv_bytes"] - before["kv_bytes"],
        "kv_bytes_from_spans": sum(kv_bytes.values()),
        "client_cpu_fractions": [r.cpu_seconds / wall if wall > 0 else 0.0 for r in results],
        **({"service_exits": report["service_exits"]} if "service_exits" in report else {}),
    }


# ---- the report -------------------------------------------------------------------------------------


def _ms(value) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def table(report: dict) -> str:
    headers = ["config", "turns", "TTFT p50", "TTFT p99", "later TTFT p50", "later TTFT p99", "prompt tok",
               "prefill computed", "hit rate", "KV MB", "later KV MB", "errors"]
    rows = []
    for name, run in report["runs"].items():
        rows.append([name, run["num_turns"], _ms(run["all_turns"]["ttft_ms"]["p50"]),
                     _ms(run["all_turns"]["ttft_ms"]["p99"]), _ms(run["later_turns"]["ttft_ms"]["p50"]),
                     _ms(run["later_turns"]["ttft_ms"]["p99"]), run["prompt_tokens"], run["prefill_tokens_computed"],
                     "-" if run["hit_rate"] is None else f"{run['hit_rate']:.1%}",
                     f"{run['kv_bytes_transferred'] / 1e6:,.1f}", f"{run['later_turns']['kv_bytes'] / 1e6:,.1f}",
                     run["num_errors"]])
    workload, settings = report["workload"], report["settings"]
    title = (f"{report['model']['shape']} {settings['dtype']}: {settings['num_prefill']}P{settings['num_decode']}D, "
             f"prefill on {','.join(settings['prefill_devices'])}, decode on {','.join(settings['decode_devices'])}; "
             f"{workload['num_conversations']} conversations x {settings['num_turns']} turns, "
             f"{workload['system_prompt_tokens']}-token shared system prompt, {settings['rate']:g} conversations/s")
    return title + "\n" + format_table(headers, rows)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)  # an outer timeout: stop the services, keep what was measured
    end = time.monotonic() + args.budget if args.budget > 0 else float("inf")
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="tandem-bench-prefix-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    model = prepare_model(args, log_dir / "model")
    workload = chat_workload(args.num_conversations, args.num_turns, args.system_prompt_len, model["vocab_size"],
                             args.max_user_len, args.max_answer_len, args.rate, args.seed)
    args.max_model_len = workload.max_prompt_len() + args.max_answer_len
    report = {"settings": {k: v for k, v in vars(args).items()}, "model": model, "workload": workload.summary(),
              "runs": {}, "skipped": [], "failure": None, "log_dir": str(log_dir)}
    try:
        with ClientPool(args.client_processes) as clients:
            for name in args.configs:
                limit = min(args.time_limit, end - time.monotonic() - SHUTDOWN_RESERVE_SECONDS)
                if limit < 10:
                    report["skipped"].append(name)
                    print(f"{name}: skipped, {limit:.0f} s left of --budget", flush=True)
                    continue
                print(f"{name}: starting services", flush=True)
                run = report["runs"][name] = measure(name, workload, model, args, log_dir, clients, limit)
                print(f"{name}: TTFT p50 {_ms(run['all_turns']['ttft_ms']['p50'])}, hit rate "
                      f"{run['hit_rate'] or 0:.1%}, {run['num_errors']} errors", flush=True)
                write_json(args.output, report)
    except (ServiceFailure, RuntimeError) as exc:
        report["failure"] = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    except KeyboardInterrupt:
        report["failure"] = "interrupted (SIGINT/SIGTERM)"
    report["table"] = table(report)
    write_json(args.output, report)
    print(f"logs: {log_dir}")
    print(report["table"])
    return 1 if report["failure"] or any(run["num_errors"] for run in report["runs"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
