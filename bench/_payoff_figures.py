"""The payoff bench's workloads and figures: ShareGPT-shaped requests with and without bursts of long
prompts, SLO attainment and goodput (DistServe), ITL p99 under bursts against without, and the table.

    sharegpt  bench/sharegpt.py's shape, Poisson arrivals at the run's rate
    bursts    the same requests, but `burst_fraction` of them (seeded pick) get a `burst_prompt_len`-token
              prompt, and those arrive `burst_size` at a time (each group at its first member's Poisson
              arrival), so a prefill of burst_size x burst_prompt_len tokens lands at once

Goodput (DistServe): the highest request rate of the sweep whose run meets the SLO, TTFT p99 <= ttft_slo
and ITL p99 <= itl_slo with every request complete; per GPU as well, since topologies use 1 or 2 GPUs.
Per run, `slo_attainment` is the share of requests that meet both on their own (their TTFT, the p99 of
their own gaps between chunks).
"""

from __future__ import annotations

import numpy as np

from bench._common import format_table, percentiles, poisson_arrivals
from bench._disagg_client import RequestRecord

WORKLOADS = ("sharegpt", "bursts")
TOPOLOGIES = ("1p1d", "1p1d-local", "2colocated", "1colocated")  # the table's row order


def burst_workload(prompts: list[list[int]], output_lens: list[int], vocab_size: int, burst_fraction: float,
                   burst_prompt_len: int, seed: int = 0) -> tuple[list[list[int]], list[int], list[int]]:
    """(prompts, output lengths, indices of the long prompts): the ShareGPT requests with
    round(burst_fraction x N) of them, picked at random (seeded), given a burst_prompt_len-token prompt."""
    rng = np.random.default_rng(seed + 1)
    num_long = round(burst_fraction * len(prompts))
    long_indices = sorted(int(i) for i in rng.choice(len(prompts), size=num_long, replace=False))
    prompts = list(prompts)
    for index in long_indices:
        prompts[index] = rng.integers(0, vocab_size, size=burst_prompt_len).tolist()
    return prompts, list(output_lens), long_indices


def burst_offsets(num_requests: int, rate: float, seed: int, long_indices: list[int], burst_size: int) -> list[float]:
    """Poisson arrivals at `rate`, except that the long prompts come `burst_size` at a time: each group
    of consecutive long requests is sent at its first member's arrival."""
    offsets = poisson_arrivals(num_requests, rate, seed)
    for start in range(0, len(long_indices), burst_size):
        group = long_indices[start: start + burst_size]
        for index in group:
            offsets[index] = offsets[group[0]]
    return offsets


def _own_itl_p99(record: RequestRecord) -> float | None:
    gaps = [b - a for a, b in zip(record.chunk_times, record.chunk_times[1:])]
    return percentiles(gaps)["p99"]


def slo_figures(records: list[RequestRecord], figures: dict, ttft_slo_s: float, itl_slo_ms: float) -> dict:
    """Whether the run meets the SLO at p99 (every request complete too), and the share of requests that
    meet it on their own."""
    ttft_p99, itl_p99 = figures["ttft_ms"]["p99"], figures["itl_ms"]["p99"]
    meets = (figures["num_errors"] == 0 and ttft_p99 is not None and ttft_p99 <= ttft_slo_s * 1e3
             and (itl_p99 is None or itl_p99 <= itl_slo_ms))
    num_attained = 0
    for record in records:
        if not record.is_complete or not record.chunk_times:
            continue
        own_itl = _own_itl_p99(record)
        if record.chunk_times[0] - record.sent <= ttft_slo_s and (own_itl is None or own_itl * 1e3 <= itl_slo_ms):
            num_attained += 1
    return {"meets_slo": meets, "slo_attainment": num_attained / len(records) if records else None,
            "requests_per_s": figures["num_completed"] / figures["wall_seconds"] if figures["wall_seconds"] else 0.0}


def rate_name(rate: float) -> str:
    return f"{rate:g}"


def run_key(topology: str, workload: str, rate: float) -> str:
    return f"{topology}/{workload}/rate-{rate_name(rate)}"


def summarize(report: dict) -> dict:
    """Per topology and workload: goodput (req/s, and per GPU), best output tok/s; per topology and rate:
    ITL p99 with bursts / without. Recomputed from the runs, so merged runs count too."""
    summary: dict = {}
    for key, run in report["runs"].items():
        topology, workload, _ = key.split("/")
        entry = summary.setdefault(topology, {"num_gpus": run["num_gpus"], "workloads": {}, "burst_itl_ratio": {}})
        group = entry["workloads"].setdefault(workload, {"goodput_rps": 0.0, "max_output_tokens_per_s": 0.0})
        group["max_output_tokens_per_s"] = max(group["max_output_tokens_per_s"], run["output_tokens_per_s"])
        if run["meets_slo"]:
            group["goodput_rps"] = max(group["goodput_rps"], run["rate"])
    for topology, entry in summary.items():
        for group in entry["workloads"].values():
            group["goodput_rps_per_gpu"] = group["goodput_rps"] / entry["num_gpus"]
        for key, run in report["runs"].items():
            if key.startswith(f"{topology}/bursts/"):
                calm = report["runs"].get(key.replace("/bursts/", "/sharegpt/"))
                calm_itl = calm["itl_ms"]["p99"] if calm else None
                entry["burst_itl_ratio"][rate_name(run["rate"])] = (
                    run["itl_ms"]["p99"] / calm_itl if calm_itl and run["itl_ms"]["p99"] is not None else None)
    return summary


def _cell(value, digits: int = 1, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def table(report: dict) -> str:
    """One row per topology and workload: goodput, best tok/s, then TTFT p99 / ITL p99 at each rate
    (bursts: and ITL p99 over the same rate's without bursts); `*` marks runs that meet the SLO."""
    summary = report["summary"]
    rates = [rate_name(rate) for rate in sorted({run["rate"] for run in report["runs"].values()})]
    slo = report["slo"]
    headers = ["topology", "GPUs", "workload", "goodput req/s", "per GPU", "best tok/s",
               *(f"{rate}/s TTFT99|ITL99" for rate in rates)]
    rows = []
    for topology in sorted(summary, key=TOPOLOGIES.index):
        entry = summary[topology]
        for workload in WORKLOADS:
            group = entry["workloads"].get(workload)
            if group is None:
                continue
            cells = []
            for rate in rates:
                run = report["runs"].get(f"{topology}/{workload}/rate-{rate}")
                if run is None:
                    cells.append("-")
                    continue
                ratio = entry["burst_itl_ratio"].get(rate) if workload == "bursts" else None
                cells.append(f"{_cell(run['ttft_ms']['p99'], 0)}|{_cell(run['itl_ms']['p99'])} ms"
                             + ("" if ratio is None else f" ({ratio:.2f}x)") + ("*" if run["meets_slo"] else ""))
            rows.append([topology, entry["num_gpus"], workload, _cell(group["goodput_rps"], 2),
                         _cell(group["goodput_rps_per_gpu"], 2), _cell(group["max_output_tokens_per_s"]), *cells])
    title = (f"{report['model']['shape']} {report['dtype']}: goodput = highest rate whose run has TTFT p99 <= "
             f"{slo['ttft_s']:g} s and ITL p99 <= {slo['itl_ms']:g} ms (*); bursts: {slo['burst_fraction']:.0%} of "
             f"requests get {slo['burst_prompt_len']}-token prompts, {slo['burst_size']} at a time; (Nx) = ITL p99 "
             f"with bursts / without at that rate")
    return title + "\n" + format_table(headers, rows)
