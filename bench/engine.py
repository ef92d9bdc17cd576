"""Engine throughput: Tandem's continuous batching against transformers `generate`, one request at a time.

    # CPU (default): the embedded SmolLM2, 16 requests of ~128 prompt + 128 output tokens
    .venv/bin/python bench/engine.py --output bench-engine-cpu.json
    # GPU: decode tokens/s at batch 1 and 64 on random Llama-3-8B weights (no transformers run),
    # through CUDA graphs (add --enforce-eager for eager decode steps)
    .venv/bin/python bench/engine.py --device cuda --model dummy:llama-3-8b --output bench-engine-gpu.json

Every request ignores EOS, so both sides generate exactly the same number of tokens. The table is
printed last; --output also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make the repository's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench._common import device_name  # noqa: E402
from common.engine.config import EngineConfig  # noqa: E402
from common.engine.llm_engine import LLMEngine  # noqa: E402
from common.engine.sampling_params import SamplingParams  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--batch-sizes", default="1,64", help="GPU mode: decode batch sizes to measure")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--enforce-eager", action="store_true", help="GPU mode: decode without CUDA graphs")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    return parser.parse_args(argv)


def random_prompts(num_prompts: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Prompts of prompt_len +- 8 random tokens (ids above the special tokens)."""
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(prompt_len + rng.randint(-8, 8))]
            for _ in range(num_prompts)]


def run_tandem(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{i}", prompt, params)
    num_tokens = 0
    while engine.has_unfinished_requests():
        num_tokens += sum(len(o.new_token_ids) for o in engine.step())
    seconds = time.perf_counter() - start
    return {"output_tokens": num_tokens, "seconds": seconds, "output_tokens_per_s": num_tokens / seconds}


@torch.inference_mode()
def run_transformers(folder, prompts: list[list[int]], output_len: int) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model.generate(torch.tensor([prompts[0][:8]]), max_new_tokens=2, do_sample=False)  # warm-up
    start = time.perf_counter()
    num_tokens = 0
    for prompt in prompts:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=output_len, min_new_tokens=output_len,
                             do_sample=False, pad_token_id=0)
        num_tokens += out.shape[1] - len(prompt)
    seconds = time.perf_counter() - start
    return {"output_tokens": num_tokens, "seconds": seconds, "output_tokens_per_s": num_tokens / seconds}


def measure_decode(engine: LLMEngine, batch_size: int, prompt_len: int, output_len: int) -> dict:
    """Decode tokens/s at a fixed batch: prefill everyone first, then time the decode steps only."""
    prompts = random_prompts(batch_size, prompt_len, engine.model_config.vocab_size, seed=batch_size)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"decode-{batch_size}-{i}", prompt, params)
    while engine.scheduler.waiting:
        engine.step()
    num_steps, num_tokens = 0, 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        num_tokens += sum(len(o.new_token_ids) for o in engine.step())
        num_steps += 1
    seconds = time.perf_counter() - start
    return {"batch_size": batch_size, "decode_steps": num_steps, "decode_tokens": num_tokens,
            "seconds": seconds, "decode_tokens_per_s": num_tokens / seconds,
            "ms_per_step": 1000 * seconds / max(num_steps, 1)}


def cpu_benchmark(args) -> tuple[dict, list[str]]:
    from common.model.registry import resolve_model

    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", dtype=args.dtype,
                                    max_model_len=args.prompt_len + args.output_len + 16))
    prompts = random_prompts(args.num_requests, args.prompt_len, engine.model_config.vocab_size)
    run_tandem(engine, [prompts[0][:16]], 2)  # warm-up
    tandem = run_tandem(engine, prompts, args.output_len)
    result = {"device": "cpu", "model": engine.model_name, "num_requests": len(prompts),
              "prompt_tokens": sum(map(len, prompts)), "output_len": args.output_len,
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "tandem": tandem}
    lines = [f"{'system':<34}{'output tok/s':>14}{'seconds':>10}",
             f"{'tandem (continuous batching)':<34}{tandem['output_tokens_per_s']:>14.1f}{tandem['seconds']:>10.1f}"]
    folder = resolve_model(args.model, "auto").folder  # None for dummy weights: nothing to compare with
    if folder is not None and not args.skip_transformers:
        hf = run_transformers(folder, prompts, args.output_len)
        result["transformers"] = hf
        result["speedup"] = tandem["output_tokens_per_s"] / hf["output_tokens_per_s"]
        lines.append(f"{'transformers generate, sequential':<34}{hf['output_tokens_per_s']:>14.1f}"
                     f"{hf['seconds']:>10.1f}")
        lines.append(f"speedup: {result['speedup']:.2f}x")
    return result, lines


def decode_benchmark(args) -> tuple[dict, list[str]]:
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    engine = LLMEngine(EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                                    max_num_seqs=max(batch_sizes), enforce_eager=args.enforce_eager,
                                    max_model_len=args.prompt_len + args.output_len + 16))
    measure_decode(engine, 2, 16, 4)  # warm-up (kernel compilation)
    runs = [measure_decode(engine, b, args.prompt_len, args.output_len) for b in batch_sizes]
    graphs = engine.model_runner.graph_runner
    result = {"device": device_name(engine.device), "model": engine.model_name,
              "prompt_len": args.prompt_len, "output_len": args.output_len,
              "cuda_graphs": graphs.num_graphs if graphs is not None else 0, "decode": runs}
    lines = [f"decode with {'CUDA graphs' if graphs is not None else 'eager steps'}",
             f"{'batch':>6}{'decode tok/s':>14}{'ms/step':>10}"]
    lines += [f"{r['batch_size']:>6}{r['decode_tokens_per_s']:>14.1f}{r['ms_per_step']:>10.2f}" for r in runs]
    return result, lines


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result, lines = cpu_benchmark(args) if args.device == "cpu" else decode_benchmark(args)
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
