"""Engine command-line flags (vLLM's names) shared by every service that runs an engine."""

from __future__ import annotations

import argparse
import re

from common.engine.config import ATTENTION_BACKENDS, DTYPES, LOAD_FORMATS, EngineConfig
from common.engine.kv_budget import KV_ROLES

_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_memory_size(text: str) -> int:
    """'4GiB', '512MB', '1e9' or '1073741824' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"invalid memory size {text!r} (examples: 4GiB, 512MB, 1073741824)")
    try:
        return int(float(match.group(1)) * _SIZE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid memory size {text!r}") from None


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """A command picks its own `--kv-role` / `--max-num-seqs` defaults with `parser.set_defaults` beforehand."""
    defaults = EngineConfig()
    group = parser.add_argument_group("engine")
    group.add_argument("--model", default=None,
                       help="HF model folder, .gguf file or dummy:<preset>; default: the embedded SmolLM2")
    group.add_argument("--load-format", choices=LOAD_FORMATS, default=defaults.load_format)
    group.add_argument("--dtype", choices=DTYPES, default=defaults.dtype,
                       help="auto = float32 on CPU, the checkpoint dtype on CUDA (bfloat16 for float32 ones)")
    group.add_argument("--device", default=defaults.device, help="auto, cpu, cuda or cuda:N")
    group.add_argument("--block-size", type=int, default=defaults.block_size)
    group.add_argument("--max-num-seqs", type=int,
                       default=parser.get_default("max_num_seqs") or defaults.max_num_seqs)
    group.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    group.add_argument("--max-model-len", type=int, default=None, help="default: the model's context length")
    group.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization,
                       help="share of the GPU's total memory this process may use (weights, activations, "
                            "KV pool, CUDA graphs and context), whatever other processes hold")
    group.add_argument("--kv-cache-memory", "--kv-cache-memory-bytes", dest="kv_cache_memory",
                       type=parse_memory_size, default=None, help="KV pool size on CPU, e.g. 2GiB (default 1GiB)")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="explicit KV pool size in blocks")
    group.add_argument("--max-num-kv-tokens", type=int, default=None,
                       help="at most this many tokens in the KV pool (default: what the memory budget holds; "
                            "for kv_producer, what a prefill worker holds)")
    group.add_argument("--kv-role", choices=KV_ROLES, default=parser.get_default("kv_role") or defaults.kv_role,
                       help="kv_producer (tandem prefill's default) caps the KV pool at a few prefill steps' "
                            "hand-offs plus one max_model_len prompt")
    group.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default=defaults.attention_backend)
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--enforce-eager", action="store_true",
                       help="CUDA: run decode steps eagerly instead of replaying captured CUDA graphs")
    group.add_argument("--cuda-graph-max-batch-size", "--max-cudagraph-capture-size",
                       dest="cuda_graph_max_batch_size", type=int, default=defaults.cuda_graph_max_batch_size,
                       help="largest decode batch captured in a CUDA graph; larger batches run eagerly")
    group.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction,
                       default=defaults.async_scheduling,
                       help="plan and launch each decode step while the previous one runs on the device, "
                            "so the host's per-step work hides behind it")
    group.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                       default=defaults.enable_prefix_caching,
                       help="reuse the KV of full blocks an earlier request computed for the same prefix")
    group.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction,
                       default=defaults.enable_chunked_prefill,
                       help="one --max-num-batched-tokens budget per step: running decodes first (one token "
                            "each), then chunks of waiting prompts fill the rest, so a long prompt never "
                            "stalls running decodes; --no-enable-chunked-prefill runs a step of prefill or "
                            "a step of decode, prefill first (long prompts still split over steps)")
    return parser


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """Builds the config (validation errors name the field) from parsed `add_engine_args` flags."""
    return EngineConfig(
        model=args.model,
        load_format=args.load_format,
        dtype=args.dtype,
        device=args.device,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len,
        kv_cache_memory_bytes=args.kv_cache_memory,
        gpu_memory_utilization=args.gpu_memory_utilization,
        num_kv_blocks=args.num_kv_blocks,
        max_num_kv_tokens=args.max_num_kv_tokens,
        kv_role=args.kv_role,
        attention_backend=args.attention_backend,
        seed=args.seed,
        enforce_eager=args.enforce_eager,
        cuda_graph_max_batch_size=args.cuda_graph_max_batch_size,
        async_scheduling=args.async_scheduling,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
    )
