"""The figures of a disaggregated-serving run and the report they go into.

    client records ─► client_figures: throughput, TTFT, ITL, TPOT, gap token #1 -> #2, errors
    collected spans ─► kv_figures: each hand-off's kv.send (prefill side) and kv.recv (decode side),
                       joined to the client's requests by trace id
    runs ─► new_report / add_ratios / table (the JSON's "table", printed last)
"""

from __future__ import annotations

import json
import os
import platform
from collections import Counter
from pathlib import Path

from bench._common import format_table, percentiles
from bench._disagg_client import RequestRecord
from bench.sharegpt import workload_summary
from common.otlp_collector import CollectedSpan, OtlpCollector
from common.tracing import Attr, SpanName


def _ms(values) -> dict[str, float | None]:
    return {k: None if v is None else v * 1e3 for k, v in percentiles(values).items()}


def _gap_1_to_2_seconds(records: list[RequestRecord]) -> list[float]:
    """Per request: token #1 -> token #2 at the client (second_token_s - ttft_s), the wait the hand-off
    lengthens; 0 where both came in one chunk."""
    gaps = []
    for record in records:
        second_token = record.second_token_seconds()
        if second_token is not None:
            gaps.append(second_token - (record.chunk_times[0] - record.sent))
    return gaps


def client_figures(records: list[RequestRecord], wall_seconds: float) -> dict:
    """What the client saw: throughput, TTFT, ITL, TPOT, the gap token #1 -> #2, errors."""
    sent = [r for r in records if r.chunk_times]
    ttfts = [r.chunk_times[0] - r.sent for r in sent]
    gaps = [b - a for r in sent for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpots = [(r.end - r.chunk_times[0]) / (r.num_tokens - 1) for r in sent if r.end is not None and r.num_tokens > 1]
    errors = [r for r in records if not r.is_complete]
    num_tokens = sum(r.num_tokens for r in records)
    return {
        "num_requests": len(records), "num_completed": len(records) - len(errors), "output_tokens": num_tokens,
        "asked_tokens": sum(r.max_tokens for r in records), "wall_seconds": wall_seconds,
        "output_tokens_per_s": num_tokens / wall_seconds if wall_seconds > 0 else 0.0,
        "ttft_ms": _ms(ttfts), "itl_ms": _ms(gaps), "tpot_ms": _ms(tpots),
        "gap_1_to_2_ms": _ms(_gap_1_to_2_seconds(sent)),
        "e2e_ms": _ms([r.end - r.sent for r in records if r.end is not None]),
        "num_errors": len(errors), "error_messages": list(dict.fromkeys(r.error for r in errors))[:5],
    }


def _kv_spans(spans: list[CollectedSpan], request_ids) -> tuple[dict[str, str], list, list]:
    """(trace id -> request id, kv.send spans, kv.recv spans) of the requests in `request_ids`, joined by
    trace: the request id is an attribute of the frontend's and the prefill worker's spans."""
    trace_request = {s.trace_id: s.attributes[Attr.REQUEST_ID] for s in spans
                     if s.attributes.get(Attr.REQUEST_ID) in request_ids}
    sends = [s for s in spans if s.name == SpanName.KV_SEND and s.trace_id in trace_request]
    recvs = [s for s in spans if s.name == SpanName.KV_RECV and s.trace_id in trace_request]
    return trace_request, sends, recvs


def _gb_per_s(spans: list[CollectedSpan]) -> list[float]:
    return [s.attributes.get(Attr.KV_BYTES, 0) / (s.duration_ns / 1e9) / 1e9 for s in spans if s.duration_ns > 0]


def kv_figures(spans: list[CollectedSpan], records: list[RequestRecord]) -> dict:
    """The run's hand-offs, from its `kv.send` (prefill side) and `kv.recv` (decode side) spans."""
    by_id = {r.request_id: r for r in records}
    trace_request, sends, recvs = _kv_spans(spans, by_id)
    shares = []
    for span in sends:
        second_token = by_id[trace_request[span.trace_id]].second_token_seconds()
        if second_token:
            shares.append(span.duration_ns / 1e9 / second_token)
    return {
        "num_sends": len(sends), "num_recvs": len(recvs), "send_ms": _ms([s.duration_ns / 1e9 for s in sends]),
        "recv_ms": _ms([s.duration_ns / 1e9 for s in recvs]), "gb_per_s": percentiles(_gb_per_s(sends)),
        "recv_gb_per_s": percentiles(_gb_per_s(recvs)),
        "bytes": percentiles([s.attributes.get(Attr.KV_BYTES, 0) for s in sends]),
        "total_bytes": sum(s.attributes.get(Attr.KV_BYTES, 0) for s in sends),
        "transports": {"send": dict(Counter(str(s.attributes.get(Attr.KV_TRANSPORT)) for s in sends)),
                       "recv": dict(Counter(str(s.attributes.get(Attr.KV_TRANSPORT)) for s in recvs))},
        "ttft_share": percentiles(shares),
        "num_failed_spans": sum(s.status == "ERROR" for s in sends + recvs),
    }


def kv_bytes_by_request(spans: list[CollectedSpan], request_ids) -> dict[str, int]:
    """KV bytes each request's hand-off moved (its `kv.send` spans), by request id."""
    trace_request, sends, _ = _kv_spans(spans, set(request_ids))
    moved: Counter = Counter()
    for span in sends:
        moved[trace_request[span.trace_id]] += span.attributes.get(Attr.KV_BYTES, 0)
    return dict(moved)


def wait_for_kv_spans(collector: OtlpCollector, records: list[RequestRecord], timeout: float) -> list[CollectedSpan]:
    """Spans once both ends of every completed request's hand-off have arrived (or `timeout` seconds passed)."""
    num_expected = sum(r.is_complete for r in records)
    request_ids = {r.request_id for r in records}

    def is_complete(spans: list[CollectedSpan]) -> bool:
        _, sends, recvs = _kv_spans(spans, request_ids)
        return min(len(sends), len(recvs)) >= num_expected

    try:
        return collector.wait_for_spans(is_complete, timeout)
    except TimeoutError:
        return collector.spans()


# ---- the report -------------------------------------------------------------------------------------


def new_report(args, model: dict, prompts, output_lens) -> dict:
    return {
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("baseline_output", "load_format")},
                     "rates": [f"{rate:g}" for rate in args.rates]},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "model": model, "dtype": args.dtype, "workload": workload_summary(prompts, output_lens),
        "topology": f"1P{args.num_decode}D",
        "devices": {"prefill": args.prefill_device, "decode": args.decode_devices, "baseline": args.baseline_device},
        "runs": {}, "phases_done": [], "skipped": [], "failure": None,
    }


def merge_previous(report: dict, path: str) -> None:
    previous = json.loads(Path(path).read_text())
    if previous.get("workload") != report["workload"]:
        raise SystemExit(f"--previous {path}: a different workload, not merging")
    for name, run in previous.get("runs", {}).items():
        report["runs"].setdefault(name, run)


def is_engine_run(name: str) -> bool:
    """The baseline runs ("engine", "engine-step-at-a-time"), as opposed to runs through the services."""
    return name == "engine" or name.startswith("engine-")


def add_ratios(report: dict) -> None:
    engine = report["runs"].get("engine")
    engine_speed = engine["useful_output_tokens_per_s"] if engine else None
    for name, run in report["runs"].items():
        speed = run["useful_output_tokens_per_s"] if is_engine_run(name) else run["output_tokens_per_s"]
        if name != "engine":
            run["ratio_to_engine"] = speed / engine_speed if engine_speed else None


def _number(value, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _service_row(report: dict, name: str, run: dict) -> list:
    kv = run["kv"]
    compiles = "n/a" if run["compiles_total"] is None else run["compiles_total"]
    gap_1_to_2 = run.get("gap_1_to_2_ms", {}).get("p50")  # absent from runs kept from an older --previous
    client_cpu = run.get("bench_process_cpu_fraction")
    frontend_cpu = (run.get("service_cpu_fractions") or {}).get("frontend")
    return [f"{report['topology']} {name}", run["num_requests"], _number(run["output_tokens_per_s"]),
            "-" if run.get("ratio_to_engine") is None else f"{run['ratio_to_engine']:.2f}x",
            *(f"{_number(run[key][p], digits=0 if key == 'ttft_ms' else 1)} ms"
              for key, p in (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("itl_ms", "p50"), ("itl_ms", "p99"),
                             ("tpot_ms", "p50"))),
            "-" if gap_1_to_2 is None else f"{_number(gap_1_to_2)} ms",
            _number(kv["send_ms"]["p50"], digits=2), _number(kv["gb_per_s"]["p50"], digits=2),
            _number(kv["ttft_share"]["p50"], digits=3), "-" if client_cpu is None else f"{client_cpu:.0%}",
            "-" if frontend_cpu is None else f"{frontend_cpu:.0%}", compiles, run["num_errors"] if not run["truncated"] else f"{run['num_errors']} (cut)"]


def table(report: dict) -> str:
    headers = ["run", "requests", "tok/s", "vs engine", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "TPOT p50",
               "gap1→2 p50", "kv p50 ms", "kv GB/s p50", "kv share p50", "client CPU", "frontend CPU", "compiles", "errors"]
    rows = []
    for name, engine in report["runs"].items():
        if is_engine_run(name):
            label = "engine 1 GPU" if name == "engine" else f"{name} 1 GPU"
            ratio = engine.get("ratio_to_engine", 1.0 if name == "engine" else None)
            rows.append([f"{label} ({engine.get('device', '')})", engine["num_requests"],
                         _number(engine["useful_output_tokens_per_s"]), "-" if ratio is None else f"{ratio:.2f}x",
                         *["-"] * 12, "cut" if engine.get("truncated") else 0])
    rows += [_service_row(report, name, run) for name, run in report["runs"].items() if not is_engine_run(name)]
    workload = report["workload"]
    devices = report["devices"]
    title = (f"{report['model']['shape']} {report['dtype']}, vocab {report['model']['vocab_size']}, prefill on "
             f"{devices['prefill']}, decode on {','.join(devices['decode'])}: ShareGPT-shaped, "
             f"{workload['num_requests']} requests, {workload['output_tokens']} output tokens; "
             f"gap1→2 = token #1 -> token #2 at the client; kv share = kv.send / time to token #2; "
             f"client CPU = the busiest client process's CPU / wall; frontend CPU = its processes' CPU time "
             f"(all threads; with --api-server-count, every API server's) / wall")
    return title + "\n" + format_table(headers, rows)
