"""Attention kernel throughput: paged decode bandwidth against copy bandwidth, prefill TFLOP/s.

    # GPU: Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, block 16), bf16
    .venv/bin/python bench/attention_kernels.py --device cuda --output bench-kernels-gpu.json
    # CPU: tiny sizes through the Triton interpreter (checks the script and the kernels, not speed)
    .venv/bin/python bench/attention_kernels.py --device cpu --output bench-kernels-cpu.json

1. Copy bandwidth: one device-to-device copy, (read + write bytes) / time: the practical ceiling.
2. Paged decode attention, batch x context: K/V bytes read / time, and its fraction of (1). The
   heuristic picks split-KV or not; the other path is timed too (single-pass, or a split into up
   to 16 partitions) so the heuristic can be tuned from the table.
3. Prefill attention of one causal prompt: TFLOP/s (4 * heads * head_dim * visible pairs).

Every kernel is checked against kernels/reference.py before it is timed (the run stops on a
mismatch). Timing: CUDA events around each call after an L2 flush, median of the repeats (on CPU:
wall clock). The table is printed last; --output also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
L2_FLUSH_BYTES = 256 << 20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    parser.add_argument("--batches", default=None, help="decode batch sizes (cuda: 1,16,64,256; cpu: 1,2)")
    parser.add_argument("--contexts", default=None, help="decode context lengths (cuda: 512,2048,8192; cpu: 16,100)")
    parser.add_argument("--prompt-len", type=int, default=None, help="prefill prompt (cuda: 2048; cpu: 48)")
    parser.add_argument("--num-heads", type=int, default=None, help="query heads (cuda: 32; cpu: 4)")
    parser.add_argument("--num-kv-heads", type=int, default=None, help="KV heads (cuda: 8; cpu: 2)")
    parser.add_argument("--head-dim", type=int, default=None, help="cuda: 128; cpu: 64")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--copy-mib", type=int, default=None, help="copy size (cuda: 1024; cpu: 16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per case (cuda: 50; cpu: 2)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    is_gpu = args.device == "cuda"
    defaults = {
        "batches": "1,16,64,256" if is_gpu else "1,2",
        "contexts": "512,2048,8192" if is_gpu else "16,100",
        "prompt_len": 2048 if is_gpu else 48,
        "num_heads": 32 if is_gpu else 4,
        "num_kv_heads": 8 if is_gpu else 2,
        "head_dim": 128 if is_gpu else 64,
        "copy_mib": 1024 if is_gpu else 16,
        "repeats": 50 if is_gpu else 2,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.contexts = [int(c) for c in str(args.contexts).split(",")]
    return args


class Timer:
    """Median milliseconds of a call; on CUDA each call starts with a cold L2 (decode reads KV once)."""

    def __init__(self, device: torch.device, repeats: int) -> None:
        self.device = device
        self.repeats = repeats
        self.flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def median_ms(self, fn: Callable[[], object]) -> float:
        fn()  # compile / warm up
        if self.device.type != "cuda":
            times = []
            for _ in range(self.repeats):
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)
            return statistics.median(times)
        times = []
        for _ in range(self.repeats):
            self.flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


def bench_copy(timer: Timer, num_mib: int) -> dict:
    src = torch.randn(num_mib << 18, device=timer.device)  # 4-byte elements: num_mib MiB
    dst = torch.empty_like(src)
    ms = timer.median_ms(lambda: dst.copy_(src))
    moved = 2 * src.numel() * src.element_size()
    return {"bytes": moved, "ms": ms, "gbps": moved / ms / 1e6}


def make_paged_batch(args, dtype, device, query_lens, context_lens, seed=0):
    """A pool with exactly the blocks the batch needs, handed out in a random (fragmented) order."""
    from common.attention.metadata import AttentionMetadata

    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-c // args.block_size) for c in context_lens]
    num_blocks = sum(blocks_per_seq)
    block_ids = torch.randperm(num_blocks, generator=generator).tolist()
    tables, cursor = [], 0
    for count in blocks_per_seq:
        tables.append(block_ids[cursor : cursor + count])
        cursor += count
    metadata = AttentionMetadata.build(query_lens, context_lens, tables, args.block_size, device=device)
    kv_cache = torch.randn(2, num_blocks, args.block_size, args.num_kv_heads, args.head_dim, device=device, dtype=dtype)
    query = torch.randn(sum(query_lens), args.num_heads, args.head_dim, device=device, dtype=dtype)
    return query, kv_cache, metadata, tables


def check_against_reference(out, query, kv_cache, metadata, scale, what: str) -> float:
    """Relative error of `out` against the fp32 reference; exits when it exceeds 1e-2."""
    from common.attention.backend import REFERENCE

    expected = REFERENCE.paged_attention(query.float(), kv_cache.float(), metadata, scale)
    error = ((out.float() - expected).norm() / expected.norm()).item()
    if not error < 1e-2:  # also catches NaN
        sys.exit(f"{what}: relative error {error:.3e} against the reference, not timing a wrong kernel")
    return error


def first_seqs(metadata, tables, num_seqs, block_size, device):
    """Metadata of the first num_seqs sequences only (the reference is too slow for full batches)."""
    from common.attention.metadata import AttentionMetadata

    starts = metadata.query_start_locs_cpu
    query_lens = [starts[i + 1] - starts[i] for i in range(num_seqs)]
    context_lens = metadata.context_lens_cpu[:num_seqs]
    return AttentionMetadata.build(query_lens, context_lens, tables[:num_seqs], block_size, device)


def bench_decode(args, timer, dtype, batch, context_len, copy_gbps) -> dict:
    from kernels.launch_utils import num_multiprocessors
    from kernels.paged_decode_attention import choose_num_splits, paged_decode_attention, plan_partitions

    device = timer.device
    query, kv_cache, metadata, tables = make_paged_batch(args, dtype, device, [1] * batch, [context_len] * batch)
    scale = args.head_dim**-0.5
    num_splits = choose_num_splits(batch, args.num_kv_heads, context_len, num_multiprocessors(device))
    num_splits = plan_partitions(context_len, num_splits)[1]
    inputs = (metadata.block_tables, metadata.context_lens, metadata.max_context_len)
    out = paged_decode_attention(query, kv_cache, *inputs, scale)
    num_checked = min(batch, 4)
    checked = first_seqs(metadata, tables, num_checked, args.block_size, device)
    error = check_against_reference(out[:num_checked], query[:num_checked], kv_cache, checked, scale, "decode")
    kv_bytes = 2 * batch * context_len * args.num_kv_heads * args.head_dim * kv_cache.element_size()
    ms = timer.median_ms(lambda: paged_decode_attention(query, kv_cache, *inputs, scale, out=out))
    row = {
        "batch": batch, "context_len": context_len, "num_splits": num_splits, "ms": ms,
        "gbps": kv_bytes / ms / 1e6, "fraction_of_copy": kv_bytes / ms / 1e6 / copy_gbps, "rel_error": error,
    }
    # The other path, for tuning the heuristic: single-pass when it split, else a split into tiles.
    other_splits = 1 if num_splits > 1 else plan_partitions(context_len, min(16, max(2, context_len // 256)))[1]
    if other_splits != num_splits:
        other = paged_decode_attention(query, kv_cache, *inputs, scale, num_splits=other_splits)
        check_against_reference(other[:num_checked], query[:num_checked], kv_cache, checked, scale, "decode")
        other_ms = timer.median_ms(
            lambda: paged_decode_attention(query, kv_cache, *inputs, scale, num_splits=other_splits, out=other)
        )
        row["other_num_splits"], row["other_gbps"] = other_splits, kv_bytes / other_ms / 1e6
    return row


def bench_prefill(args, timer, dtype) -> dict:
    from kernels.prefill_attention import prefill_attention

    n = args.prompt_len
    query, kv_cache, metadata, _ = make_paged_batch(args, dtype, timer.device, [n], [n])
    scale = args.head_dim**-0.5
    inputs = (metadata.block_tables, metadata.query_start_locs, metadata.context_lens, metadata.max_query_len)
    out = prefill_attention(query, kv_cache, *inputs, scale)
    error = check_against_reference(out, query, kv_cache, metadata, scale, "prefill")
    ms = timer.median_ms(lambda: prefill_attention(query, kv_cache, *inputs, scale, out=out))
    flops = 4 * args.num_heads * args.head_dim * (n * (n + 1) // 2)  # QK^T and PV over visible pairs
    return {"prompt_len": n, "ms": ms, "tflops": flops / ms / 1e9, "rel_error": error}


def format_table(results: dict) -> str:
    copy = results["copy"]
    lines = [
        f"device: {results['device']}  dtype: {results['dtype']}  shapes: {results['shapes']}",
        f"copy bandwidth: {copy['gbps']:.1f} GB/s ({copy['bytes'] / 2**20:.0f} MiB read + written)",
        "",
        f"{'batch':>6} {'context':>8} {'splits':>6} {'us':>10} {'GB/s':>9} {'of copy':>8}   other path (splits: GB/s)",
    ]
    for row in results["decode"]:
        other = f"{row['other_num_splits']}: {row['other_gbps']:.4g}" if "other_gbps" in row else "-"
        lines.append(
            f"{row['batch']:>6} {row['context_len']:>8} {row['num_splits']:>6} {row['ms'] * 1e3:>10.1f} "
            f"{row['gbps']:>9.4g} {row['fraction_of_copy']:>8.1%}   {other}"
        )
    prefill = results["prefill"]
    lines += ["", f"prefill, {prefill['prompt_len']}-token causal prompt: {prefill['ms']:.3f} ms, "
              f"{prefill['tflops']:.4g} TFLOP/s"]
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (kernels import it)
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        sys.exit("--device cuda but no CUDA device is visible (use --device cpu for the interpreter run)")
    import triton

    import common.attention  # noqa: F401  (import order: kernels.reference needs common.attention first)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    timer = Timer(device, args.repeats)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__, "dtype": args.dtype,
        "shapes": f"heads {args.num_heads}/{args.num_kv_heads} kv, head_dim {args.head_dim}, block {args.block_size}",
    }
    results["copy"] = bench_copy(timer, args.copy_mib)
    results["decode"] = []
    for batch in args.batches:
        for context_len in args.contexts:
            row = bench_decode(args, timer, dtype, batch, context_len, results["copy"]["gbps"])
            results["decode"].append(row)
            print(f"decode batch {batch} context {context_len}: {row['gbps']:.1f} GB/s", flush=True)
    results["prefill"] = bench_prefill(args, timer, dtype)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2) + "\n")
    print(format_table(results))


if __name__ == "__main__":
    main()
