"""Offline throughput on the ShareGPT-shaped workload: Tandem's engine against transformers, same weights.

    # CUDA, all systems, N = 1000 on random Llama-3-8B weights (bf16); about 9 minutes on an H100
    python3 bench/sharegpt.py --output sharegpt.json
    # the same in separate runs, then one table
    python3 bench/sharegpt.py --baselines none --output tandem.json
    python3 bench/sharegpt.py --no-tandem --baselines static --output static.json
    python3 bench/sharegpt.py --no-tandem --baselines cb --output cb.json
    python3 bench/sharegpt.py --merge tandem.json static.json cb.json --output sharegpt.json
    # mixed steps (the default) against the step-at-a-time engine, in one command or two
    python3 bench/sharegpt.py --baselines none --compare-step-at-a-time --output tandem.json
    python3 bench/sharegpt.py --baselines none --no-enable-chunked-prefill --output step.json
    # CPU: a functional run on a tiny model
    python3 bench/sharegpt.py --device cpu --model dummy:tiny --num-requests 8 --static-requests 4 \\
        --static-batch-size 2 --max-input-len 48 --max-output-len 12

Workload (docs: /work/shared GPU facts, "ShareGPT-shaped"): rng = numpy default_rng(0); input lengths
clip(lognormal(ln 200 - 0.5, 1), 4, 1024), then output lengths clip(lognormal(ln 180 - 0.5, 1), 4, 512),
as ints; then random token-id prompts from the same rng. Every request generates exactly its output
length (greedy, EOS ignored). Systems:

    tandem  LLMEngine, all N requests added at once, --max-num-seqs 256, CUDA graphs, mixed steps
            (--enable-chunked-prefill); with --no-enable-chunked-prefill or --compare-step-at-a-time,
            "tandem-step-at-a-time" is the same engine running a step of prefill or a step of decode
    static  transformers `generate`, static batches of 64 left-padded, each run to its longest output,
            on the first 256 requests (useful tokens: each request's own length only)
    cb      transformers' continuous batching on all N requests

Each system's timed loop stops at --time-limit seconds (then counts what finished; marked truncated).
The table (useful output tokens/s, Tandem's ratio to each baseline) is printed last.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import environment, format_table, load_benchmark_model, require_device, write_json  # noqa: E402
from common.heap import freeze_startup_heap  # noqa: E402

BASELINES = ("static", "cb")
STEP_AT_A_TIME = "tandem-step-at-a-time"  # the engine without mixed steps (--no-enable-chunked-prefill)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--num-requests", type=int, default=1000)
    parser.add_argument("--max-input-len", type=int, default=1024, help="the workload's input clip")
    parser.add_argument("--max-output-len", type=int, default=512, help="the workload's output clip")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--enforce-eager", action="store_true")
    parser.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=True,
                        help="launch each decode step while the previous one runs (the engine's default)")
    parser.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=True,
                        help="mixed steps: decodes and prompt chunks share each step's token budget (the "
                             "engine's default); off: the step-at-a-time engine")
    parser.add_argument("--compare-step-at-a-time", action="store_true",
                        help="also run the engine with --no-enable-chunked-prefill, in the same process")
    parser.add_argument("--baselines", default="static,cb", help="static, cb (comma separated) or none")
    parser.add_argument("--no-tandem", action="store_true", help="run only the baselines")
    parser.add_argument("--static-requests", type=int, default=256)
    parser.add_argument("--static-batch-size", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=200.0, help="seconds per system's timed loop")
    parser.add_argument("--merge", nargs="+", default=None, help="JSON files of earlier runs to combine")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    args.baselines = [] if args.baselines == "none" else args.baselines.split(",")
    if any(name not in BASELINES for name in args.baselines):
        parser.error(f"--baselines takes a subset of {BASELINES} or none, got {args.baselines}")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def sharegpt_workload(num_requests: int, vocab_size: int, max_input_len: int = 1024, max_output_len: int = 512,
                      seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """(prompts, output lengths) of the ShareGPT-shaped workload (see the module docstring)."""
    rng = np.random.default_rng(seed)
    input_lens = np.clip(rng.lognormal(np.log(200) - 0.5, 1.0, num_requests), 4, max_input_len).astype(int)
    output_lens = np.clip(rng.lognormal(np.log(180) - 0.5, 1.0, num_requests), 4, max_output_len).astype(int)
    prompts = [rng.integers(0, vocab_size, size=int(n)).tolist() for n in input_lens]
    return prompts, [int(n) for n in output_lens]


def workload_summary(prompts: list[list[int]], output_lens: list[int]) -> dict:
    lengths = json.dumps([list(map(len, prompts)), output_lens]).encode()
    return {"num_requests": len(prompts), "prompt_tokens": sum(map(len, prompts)),
            "output_tokens": sum(output_lens), "lengths_sha256": hashlib.sha256(lengths).hexdigest()[:16]}


def build_engine(args, model, model_config, enable_chunked_prefill: bool):
    from common.engine.config import EngineConfig
    from common.engine.llm_engine import LLMEngine

    config = EngineConfig(
        model=args.model, device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=max(args.max_num_batched_tokens, args.max_num_seqs),
        max_model_len=args.max_input_len + args.max_output_len, gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager, kv_cache_memory_bytes=None if args.device.startswith("cuda") else 1 << 28,
        async_scheduling=args.async_scheduling, enable_chunked_prefill=enable_chunked_prefill,
    )
    return LLMEngine(config, model=model, model_config=model_config)


def run_tandem(engine, prompts: list[list[int]], output_lens: list[int], time_limit: float) -> dict:
    """All requests added at once, stepped until done (or time_limit seconds)."""
    from common.engine.sampling_params import SamplingParams

    for i in range(2):  # warm-up: a prefill and a few decode steps
        engine.add_request(f"warm-up-{i}", prompts[i][:16], SamplingParams(temperature=0, max_tokens=4))
    while engine.has_unfinished_requests():
        engine.step()
    freeze_startup_heap()  # as the services do before they serve
    start_stats = engine.stats()
    start = time.perf_counter()
    for i, (prompt, num_tokens) in enumerate(zip(prompts, output_lens)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True))
    num_tokens, num_steps, num_finished = 0, 0, 0
    while engine.has_unfinished_requests() and time.perf_counter() - start < time_limit:
        for output in engine.step():
            num_tokens += len(output.new_token_ids)
            num_finished += output.finished
        num_steps += 1
    seconds = time.perf_counter() - start
    stats = engine.stats()
    policy = "mixed steps" if engine.config.enable_chunked_prefill else "step at a time"
    return {"system": f"tandem (LLMEngine, {policy})", "num_requests": num_finished, "useful_output_tokens": num_tokens,
            "seconds": seconds, "useful_output_tokens_per_s": num_tokens / seconds, "steps": num_steps,
            "num_preemptions": stats.num_preemptions - start_stats.num_preemptions,
            "enable_chunked_prefill": engine.config.enable_chunked_prefill,
            "cuda_graphs": engine.model_runner.graph_runner is not None, "truncated": num_finished < len(prompts)}


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def checkpoint(args, result: dict) -> None:
    """Writes what is done so far: a run cut short by an outer timeout keeps its finished systems."""
    add_ratios(result)
    write_json(args.output, result)


def run_all(args, device) -> dict:
    model, model_config = load_benchmark_model(args.model, device, args.dtype)
    prompts, output_lens = sharegpt_workload(args.num_requests, model_config.vocab_size, args.max_input_len,
                                             args.max_output_len)
    result = {"environment": environment(device), "model": args.model, "dtype": args.dtype,
              "workload": workload_summary(prompts, output_lens), "results": {}}
    if not args.no_tandem:
        policies = [args.enable_chunked_prefill] + ([False] if args.compare_step_at_a_time else [])
        for enable_chunked_prefill in dict.fromkeys(policies):
            name = "tandem" if enable_chunked_prefill else STEP_AT_A_TIME
            engine = build_engine(args, model, model_config, enable_chunked_prefill)
            result["results"][name] = run_tandem(engine, prompts, output_lens, args.time_limit)
            print(f"{name}: {result['results'][name]['useful_output_tokens_per_s']:.1f} useful output tok/s",
                  flush=True)
            checkpoint(args, result)
            del engine
            free_device_memory(device)
    if args.baselines:
        from bench._transformers_baselines import run_continuous_batching, run_static, transformers_twin

        twin = transformers_twin(model, model_config)
        if "static" in args.baselines:
            count = min(args.static_requests, len(prompts))
            result["results"]["static"] = run_static(twin, prompts[:count], output_lens[:count],
                                                     args.static_batch_size, args.time_limit)
            print(f"static: {result['results']['static']['useful_output_tokens_per_s']:.1f} tok/s", flush=True)
            checkpoint(args, result)
            free_device_memory(device)
        if "cb" in args.baselines:
            result["results"]["cb"] = run_continuous_batching(twin, prompts, output_lens, args.time_limit)
            print(f"cb: {result['results']['cb']['useful_output_tokens_per_s']:.1f} tok/s", flush=True)
    return result


def merge(paths: list[str]) -> dict:
    """One result from several runs on the same workload (later files win on a repeated system)."""
    merged = None
    for path in paths:
        part = json.loads(Path(path).read_text())
        if merged is None:
            merged = part
            continue
        if part["workload"] != merged["workload"] or part["model"] != merged["model"]:
            raise SystemExit(f"{path}: a different workload or model than {paths[0]}, not merging")
        merged["results"].update(part["results"])
    return merged


def add_ratios(result: dict) -> None:
    results = result["results"]
    if "tandem" in results:
        tandem = results["tandem"]["useful_output_tokens_per_s"]
        result["ratios"] = {f"tandem/{name}": tandem / results[name]["useful_output_tokens_per_s"]
                            for name in (STEP_AT_A_TIME, *BASELINES) if name in results}


def table(result: dict) -> str:
    workload = result["workload"]
    lines = [f"{result['environment']['device']}, {result['model']} {result['dtype']}: ShareGPT-shaped, "
             f"{workload['num_requests']} requests, {workload['output_tokens']} output tokens"]
    tandem = result["results"].get("tandem")
    rows = []
    for name, run in result["results"].items():
        rate = run["useful_output_tokens_per_s"]
        ratio = "-" if tandem is None or name == "tandem" else f"{tandem['useful_output_tokens_per_s'] / rate:.2f}x"
        rows.append([run["system"], run["num_requests"], rate, run["seconds"],
                     "yes" if run.get("truncated") else "no", ratio])
    headers = ["system", "requests", "useful out tok/s", "seconds", "truncated", "tandem is"]
    return "\n".join(lines) + "\n" + format_table(headers, rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.merge:
        result = merge(args.merge)
    else:
        device = require_device(args.device)
        torch.manual_seed(0)
        result = run_all(args, device)
    add_ratios(result)
    write_json(args.output, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
