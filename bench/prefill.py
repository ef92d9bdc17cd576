"""Prefill of one long prompt through the engine's model runner, as a fraction of the matmul rate.

    # CUDA: one 2,048-token prompt on the Llama-3-8B shape, bf16, against an 8192^3 bf16 matmul
    python3 bench/prefill.py --output prefill.json
    # CPU: a functional run on a tiny model
    python3 bench/prefill.py --device cpu --model dummy:tiny --prompt-len 64 --matmul-size 256 --repeats 2

A prefill step is compute bound. Its model FLOPs:

    matmuls:   2 x (matmul weights of the layers) x tokens + 2 x (LM head) x 1   (logits of the last token only)
    attention: 4 x heads x head_dim x (causal query-key pairs, T (T + 1) / 2) x layers

`fraction` = (model FLOPs / step time) / (matmul rate measured in the same run); target >= 0.5.
The naive count 2 x all parameters x tokens + attention is in the JSON too. The step is
`ModelRunner.run` on a prefill plan (eager, with sampling of token #1), wall clock, median.
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
    DTYPES, environment, format_table, load_benchmark_model, measure_matmul_rate, require_device, wall_ms,
    write_json,
)
from common.engine.config import EngineConfig  # noqa: E402
from common.engine.llm_engine import LLMEngine  # noqa: E402
from common.engine.sampling_params import SamplingParams  # noqa: E402
from common.engine.scheduler import SchedulerPlan  # noqa: E402
from common.engine.sequence import Sequence  # noqa: E402

TARGET_FRACTION = 0.5


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dummy:llama-3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--matmul-size", type=int, default=None, help="cuda: 8192; cpu: 256")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    is_cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if is_cuda else "float32")
    args.matmul_size = args.matmul_size or (8192 if is_cuda else 256)
    return args


def prefill_flops(model_config, parameter_counts: dict, num_tokens: int) -> dict:
    """Model FLOPs of one prompt (see the module docstring), and the naive 2 x parameters x tokens count."""
    pairs = num_tokens * (num_tokens + 1) // 2
    attention = 4 * model_config.num_attention_heads * model_config.head_dim * pairs * model_config.num_hidden_layers
    matmuls = 2 * parameter_counts["layers"] * num_tokens + 2 * parameter_counts["lm_head"]
    naive = 2 * parameter_counts["total"] * num_tokens + attention
    return {"matmul": matmuls, "attention": attention, "model": matmuls + attention, "naive": naive}


def parameter_counts(model: torch.nn.Module) -> dict:
    """All parameters; the LM head's; the matmul weights of the layers (no norms, biases or embedding)."""
    total = sum(p.numel() for p in model.parameters())
    lm_head = model.model.embed_tokens if model.lm_head is None else model.lm_head
    layers = sum(p.numel() for name, p in model.model.layers.named_parameters() if name.endswith("proj.weight"))
    return {"total": total, "lm_head": lm_head.weight.numel(), "layers": layers}


def prompt_plan(engine: LLMEngine, prompt_len: int) -> SchedulerPlan:
    """A prefill plan for one random prompt, with its blocks allocated."""
    rng = random.Random(0)
    seq = Sequence("prompt", [rng.randrange(engine.model_config.vocab_size) for _ in range(prompt_len)],
                   SamplingParams(temperature=0, max_tokens=1))
    seq.block_table = engine.allocator.allocate(-(-prompt_len // engine.config.block_size))
    plan = SchedulerPlan(is_prefill=True)
    plan.add(seq, prompt_len, is_sampled=True)
    return plan


def main(argv=None) -> int:
    args = parse_args(argv)
    device = require_device(args.device)
    matmul = measure_matmul_rate(device, args.matmul_size, DTYPES[args.dtype])
    model, model_config = load_benchmark_model(args.model, device, args.dtype)
    num_blocks = -(-(args.prompt_len + 1) // args.block_size)
    config = EngineConfig(model=args.model, device=str(device), dtype=args.dtype, block_size=args.block_size,
                          max_num_seqs=1, max_num_batched_tokens=args.prompt_len, max_model_len=args.prompt_len + 1,
                          num_kv_blocks=num_blocks, enforce_eager=True)
    engine = LLMEngine(config, model=model, model_config=model_config)
    plan = prompt_plan(engine, args.prompt_len)
    timing = wall_ms(lambda: engine.model_runner.run(plan), device, args.repeats, warmup=2)
    flops = prefill_flops(model_config, parameter_counts(model), args.prompt_len)
    seconds = timing["median_ms"] / 1e3
    model_tflops = flops["model"] / seconds / 1e12
    result = {
        "environment": environment(device), "model": args.model, "dtype": args.dtype,
        "prompt_len": args.prompt_len, "matmul": matmul, **timing, "flops": flops,
        "model_tflops": model_tflops, "naive_tflops": flops["naive"] / seconds / 1e12,
        "fraction_of_matmul": model_tflops / matmul["tflops"], "target_fraction": TARGET_FRACTION,
    }
    write_json(args.output, result)
    print(f"{result['environment']['device']}: {args.matmul_size}^3 {args.dtype} matmul "
          f"{matmul['tflops']:.1f} TFLOP/s; {args.model}, one {args.prompt_len}-token prompt")
    print(format_table(
        ["ms", "model TFLOP", "TFLOP/s", "of matmul", "target", "naive TFLOP/s"],
        [[timing["median_ms"], flops["model"] / 1e12, model_tflops, result["fraction_of_matmul"],
          f">= {TARGET_FRACTION}", result["naive_tflops"]]],
    ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
