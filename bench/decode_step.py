"""One decode step of a Llama-3-8B-shaped model through the engine's model runner, against its roofline.

    # CUDA: batch 1 at context 512 and batch 64 at context 1024, CUDA graphs and eager, bf16
    python3 bench/decode_step.py --output decode-step.json
    # CPU: a functional run on a tiny model (eager only: graphs need CUDA)
    python3 bench/decode_step.py --device cpu --model dummy:tiny --cases 1:32,4:64 --repeats 3

A step is `ModelRunner.run` on a decode plan (the engine's real path: staged inputs, graph replay
or eager forward, greedy sampling, the one host synchronisation), timed on the wall clock. A decode
step is memory bound, so its floor is the bytes it must read over the copy bandwidth measured in
the same run:

    roofline = (parameter bytes + batch x context x KV bytes per token) / copy bandwidth

`ratio` = step time / roofline (targets: <= 1.25 at batch 1, <= 1.3 at batch 64). `replay ms` is
the graph alone, back to back, without host work. The table is printed last; --output writes JSON.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._common import (  # noqa: E402
    device_ms, environment, format_table, kv_bytes_per_token, load_benchmark_model, measure_copy_bandwidth,
    parameter_bytes, require_device, wall_ms, write_json,
)
from common.engine.config import EngineConfig  # noqa: E402
from common.engine.llm_engine import LLMEngine  # noqa: E402
from common.engine.model_runner import ModelRunner  # noqa: E402
from common.engine.sampling_params import SamplingParams  # noqa: E402
from common.engine.scheduler import SchedulerPlan  # noqa: E402
from common.engine.sequence import Sequence  # noqa: E402

TARGET_RATIOS = {1: 1.25, 64: 1.3}  # batch size -> target step time / roofline


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--cases", default="1:512,64:1024", help="batch:context pairs")
    parser.add_argument("--modes", default="graphs,eager", help="graphs and/or eager (CPU: eager only)")
    parser.add_argument("--max-model-len", type=int, default=4096, help="sets the graphs' context buckets")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--copy-mib", type=int, default=None, help="copy size (cuda: 1024; cpu: 64)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    is_cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if is_cuda else "float32")
    args.copy_mib = args.copy_mib or (1024 if is_cuda else 64)
    args.cases = [tuple(int(v) for v in case.split(":")) for case in args.cases.split(",")]
    args.modes = [mode for mode in args.modes.split(",") if mode]
    if any(mode not in ("graphs", "eager") for mode in args.modes):
        parser.error(f"--modes takes graphs and/or eager, got {args.modes}")
    if any(context > args.max_model_len for _, context in args.cases):
        parser.error("every case's context must fit in --max-model-len")
    return args


def decoding_seqs(engine: LLMEngine, batch: int, context_len: int, seed: int) -> list[Sequence]:
    """`batch` sequences about to decode their token at position context_len - 1, with their blocks."""
    rng = random.Random(seed)
    vocab_size = engine.model_config.vocab_size
    seqs = []
    for i in range(batch):
        seq = Sequence(f"b{batch}-{i}", [rng.randrange(vocab_size) for _ in range(context_len)],
                       SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True))
        seq.block_table = engine.allocator.allocate(-(-context_len // engine.config.block_size))
        seq.num_computed_tokens = context_len - 1
        seqs.append(seq)
    return seqs


def build(args, device) -> tuple[LLMEngine, dict[str, ModelRunner]]:
    """The engine (graphs when asked for and possible) and a runner per mode, sharing model and pool."""
    model, model_config = load_benchmark_model(args.model, device, args.dtype)
    max_batch = max(batch for batch, _ in args.cases)
    blocks = sum(batch * -(-context // args.block_size) for batch, context in args.cases)
    config = EngineConfig(
        model=args.model, device=str(device), dtype=args.dtype, block_size=args.block_size, max_num_seqs=max_batch,
        max_num_batched_tokens=max(max_batch, 2048), max_model_len=args.max_model_len,
        num_kv_blocks=blocks + -(-args.max_model_len // args.block_size), cuda_graph_max_batch_size=max_batch,
        enforce_eager="graphs" not in args.modes or device.type != "cuda",
    )
    engine = LLMEngine(config, model=model, model_config=model_config)
    runners = {}
    if "graphs" in args.modes and engine.model_runner.graph_runner is not None:
        runners["graphs"] = engine.model_runner
    if "eager" in args.modes:
        runners["eager"] = ModelRunner(
            model, engine.kv_pool, device, config.seed, max_num_seqs=max_batch, max_model_len=engine.max_model_len,
            scratch_block_id=engine.allocator.num_blocks,
        )
    return engine, runners


def time_case(engine, runners, args, device, batch, context_len, copy_gbps, weights) -> list[dict]:
    seqs = decoding_seqs(engine, batch, context_len, seed=batch)
    plan = SchedulerPlan(is_prefill=False)
    for seq in seqs:
        plan.add(seq, 1, is_sampled=True)
    kv_bytes = batch * context_len * kv_bytes_per_token(engine.model_config, engine.kv_pool.layout.torch_dtype)
    roofline_ms = (weights["total"] + kv_bytes) / copy_gbps / 1e6
    embedding_rows = batch * weights["embedding"] // engine.model_config.vocab_size
    strict_ms = (weights["read_whole"] + embedding_rows + kv_bytes) / copy_gbps / 1e6
    rows = []
    for mode, runner in runners.items():
        timing = wall_ms(lambda: runner.run(plan), device, args.repeats, warmup=3)
        row = {"batch": batch, "context_len": context_len, "mode": mode, **timing,
               "roofline_ms": roofline_ms, "ratio": timing["median_ms"] / roofline_ms,
               "ratio_strict": timing["median_ms"] / strict_ms, "kv_bytes": kv_bytes,
               "tokens_per_s": batch / timing["median_ms"] * 1e3, "target_ratio": TARGET_RATIOS.get(batch)}
        graphs = runner.graph_runner
        if graphs is not None and graphs.is_captured:
            num_rows = graphs.padded_size(batch)
            prepared = runner.decode_buffers.prepare(seqs, num_rows)
            row["padded_batch"] = num_rows
            row["replay_ms"] = device_ms(lambda: graphs.replay(prepared), device, args.repeats)
        rows.append(row)
        print(f"batch {batch} context {context_len} {mode}: {timing['median_ms']:.3f} ms "
              f"({row['ratio']:.3f} x roofline)", flush=True)
    for seq in seqs:
        engine.allocator.free(seq.block_table)
    return rows


def table(result: dict) -> str:
    rows = []
    for r in result["cases"]:
        target = f"<= {r['target_ratio']}" if r["target_ratio"] else "-"
        rows.append([r["batch"], r["context_len"], r["mode"], r["median_ms"], r.get("replay_ms", "-"),
                     r["roofline_ms"], r["ratio"], target, r["tokens_per_s"]])
    copy, weights = result["copy"], result["model"]
    header = (f"{result['environment']['device']}: copy {copy['gbps']:.1f} GB/s; {result['model']['name']} "
              f"{weights['parameter_bytes'] / 1e9:.2f} GB of parameters, {result['dtype']}")
    return header + "\n" + format_table(
        ["batch", "context", "mode", "ms/step", "replay ms", "roofline ms", "ratio", "target", "tok/s"], rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = require_device(args.device)
    torch.manual_seed(0)
    copy = measure_copy_bandwidth(device, args.copy_mib)
    engine, runners = build(args, device)
    weights = parameter_bytes(engine.model)
    result = {"environment": environment(device), "dtype": args.dtype, "copy": copy,
              "model": {"name": args.model, "parameter_bytes": weights["total"],
                        "parameter_bytes_read_whole": weights["read_whole"]},
              "modes": list(runners), "cases": []}
    if engine.model_runner.graph_runner is not None:
        result["num_graphs"] = engine.model_runner.graph_runner.num_graphs
    for batch, context_len in args.cases:
        result["cases"] += time_case(engine, runners, args, device, batch, context_len, copy["gbps"], weights)
    write_json(args.output, result)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
