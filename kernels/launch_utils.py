"""What every Triton launcher in this folder shares: input checks, picking how a kernel runs, and
knowing which compiled variants launches use (the section at the end).

On CUDA a kernel runs compiled. On CPU it can only run in the Triton interpreter, which is chosen
by TRITON_INTERPRET=1. Triton reads that variable when `@triton.jit` decorates a function, so a
module (or triton itself) imported before the variable was set holds compiled-only kernels;
`runnable_kernel` reads the variable at launch time instead and runs such kernels interpreted, so
the import order of a process (e.g. a pytest session) does not matter.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from typing import Any, Iterable, Iterator

import torch
import triton
import triton.language as tl

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)

_interpreted: dict[int, tuple[Any, Any]] = {}  # id(jit function) -> (it, its interpreted twin)


def is_interpreter_enabled() -> bool:
    knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older releases only read the variable
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def runnable_kernel(kernel: Any, device: torch.device) -> Any:
    """Returns `kernel`, or a launcher running it in the interpreter when the tensors live on the CPU."""
    if device.type == "cuda":
        return kernel
    if not is_interpreter_enabled():
        raise RuntimeError(
            f"Triton kernels cannot run on {device.type} tensors unless TRITON_INTERPRET=1 is set "
            "(use the 'reference' attention backend on CPU)"
        )
    return _InterpretedLauncher(_interpreted_twin(kernel))


def _interpreted_twin(function: Any) -> Any:
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(function, InterpretedFunction):
        return function
    # Keyed by id: hashing a JITFunction analyses its source, which fails while the interpreter
    # has triton.language patched. Kernels are module-level objects, so ids are never reused.
    key = id(function)
    if key not in _interpreted:
        _interpreted[key] = (function, InterpretedFunction(function.fn))
    return _interpreted[key][1]


class _InterpretedLauncher:
    """`launcher[grid](*args)` like a kernel; calls to compiled-only `@triton.jit` functions made
    while it runs (triton.language's own `tl.sum`, `tl.max`, ... when triton was imported without
    TRITON_INTERPRET=1) are routed to their interpreted twins."""

    def __init__(self, interpreted: Any) -> None:
        self.interpreted = interpreted

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **kwargs: Any) -> Any:
            from triton.runtime.jit import JITFunction

            compiled_call = JITFunction.__call__
            JITFunction.__call__ = lambda self, *a, **kw: _interpreted_twin(self)(*a, **kw)
            try:
                return self.interpreted[grid](*args, **kwargs)
            finally:
                JITFunction.__call__ = compiled_call

        return launch


def check_tensor(
    name: str,
    tensor: Any,
    *,
    ndim: int,
    dtypes: Iterable[torch.dtype],
    device: torch.device | None = None,
    is_contiguous: bool = False,
) -> None:
    """Raises ValueError naming `name` when the tensor has the wrong rank, dtype, device or layout."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(tensor.shape)}")
    dtypes = tuple(dtypes)
    if tensor.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in {dtypes}, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device}, expected {device}")
    if is_contiguous and not tensor.is_contiguous():
        raise ValueError(f"{name} must be contiguous, got strides {tensor.stride()}")
    if tensor.numel() > 0 and tensor.shape[-1] > 1 and tensor.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tensor.stride()}")


def check_kv_cache(kv_cache: torch.Tensor, num_kv_heads_expected: int | None, head_dim: int) -> None:
    """kv_cache: [2, num_blocks, block_size, num_kv_heads, head_dim], contiguous."""
    check_tensor("kv_cache", kv_cache, ndim=5, dtypes=FLOAT_DTYPES, is_contiguous=True)
    if kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache dim 0 must be 2 (K, V), got shape {tuple(kv_cache.shape)}")
    if kv_cache.shape[4] != head_dim:
        raise ValueError(f"kv_cache head_dim {kv_cache.shape[4]} does not match {head_dim}")
    if num_kv_heads_expected is not None and kv_cache.shape[3] != num_kv_heads_expected:
        raise ValueError(f"kv_cache has {kv_cache.shape[3]} KV heads, expected {num_kv_heads_expected}")


def check_out(out: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Returns `out` after checking it can hold a result shaped and typed like `like`, else a new one."""
    if out is None:
        return torch.empty_like(like, memory_format=torch.contiguous_format)
    check_tensor("out", out, ndim=like.dim(), dtypes=(like.dtype,), device=like.device)
    if out.shape != like.shape:
        raise ValueError(f"out must have shape {tuple(like.shape)}, got {tuple(out.shape)}")
    return out


def dot_operand_dtype(dtype: torch.dtype, device: torch.device) -> tl.dtype:
    """The dtype tl.dot operands are cast to: the input dtype, except bf16 in the interpreter.

    The interpreter multiplies bf16 operands as their raw uint16 bits (triton 3.9), so there they
    are widened to fp32 first; the products are exact either way and accumulate in fp32.
    """
    if dtype == torch.bfloat16 and (device.type != "cuda" or is_interpreter_enabled()):
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep full precision in tl.dot (the default would round them to tf32 on GPU)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def num_multiprocessors(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; an H100-sized guess elsewhere (interpreter runs)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def check_attention_inputs(
    query: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_num_blocks]
    context_lens: torch.Tensor,  # [num_seqs]
    block_n: int,
    query_start_locs: torch.Tensor | None = None,  # [num_seqs + 1]; prefill only
) -> None:
    """Shared checks of the decode and prefill launchers."""
    check_tensor("query", query, ndim=3, dtypes=FLOAT_DTYPES)
    num_heads, head_dim = query.shape[1], query.shape[2]
    check_kv_cache(kv_cache, None, head_dim)
    if kv_cache.dtype != query.dtype:
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} must match query dtype {query.dtype}")
    if kv_cache.device != query.device:
        raise ValueError(f"kv_cache is on {kv_cache.device}, query on {query.device}")
    if num_heads % kv_cache.shape[3] != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {kv_cache.shape[3]}")
    check_tensor("context_lens", context_lens, ndim=1, dtypes=INDEX_DTYPES, device=query.device)
    num_seqs = context_lens.shape[0]
    check_tensor("block_tables", block_tables, ndim=2, dtypes=INDEX_DTYPES, device=query.device)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"context_lens describes {num_seqs} sequences but block_tables has "
                         f"{block_tables.shape[0]} rows")
    if query_start_locs is not None:
        check_tensor("query_start_locs", query_start_locs, ndim=1, dtypes=INDEX_DTYPES, device=query.device)
        if query_start_locs.shape[0] != num_seqs + 1:
            raise ValueError(f"context_lens describes {num_seqs} sequences but query_start_locs has "
                             f"{query_start_locs.shape[0]} entries (need num_seqs + 1)")
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"block_n must be a power of two >= 16, got {block_n}")


# ---- which compiled variants launches use ---------------------------------------------------------
#
# Triton compiles one variant of a kernel per distinct key: its constexpr values, the dtype of each
# pointer and whether it is 16-byte aligned, and for each integer argument not marked
# `do_not_specialize` whether it is 1 (then a constant) or a multiple of 16, plus launch options
# (num_warps, num_stages). The kernels here take as plain (specialised) integers only sizes fixed by
# the model's shapes; sizes that follow a step (block-table widths, split counts) are
# do_not_specialize, and constexprs come from small fixed sets (common/engine/warmup.py lists them).
#
# Inside `recording_variant_keys()`, `launch` records each launch's key, compiled or interpreted, so
# a CPU test can check which variants a workload needs (computing a key costs ~10 us, so it is off
# otherwise). `num_compiled_variants` counts what Triton really compiled: its per-device JIT caches.

_variant_keys: set[tuple] = set()  # every key recorded in this process
_recordings: list[set[tuple]] = []  # the sets of the recording_variant_keys blocks now open
_launched_kernels: dict[int, Any] = {}  # id(jit function) -> it, for every kernel launched so far
_kernel_params: dict[int, tuple[tuple[str, bool, bool, bool], ...]] = {}  # id -> see _params_of


def launch(kernel: Any, grid: tuple[int, ...], device: torch.device, *args: Any, **kwargs: Any) -> None:
    """`kernel[grid](*args, **kwargs)` on `device` (interpreted on CPU); records its variant key
    while a `recording_variant_keys` block is open."""
    _launched_kernels.setdefault(id(kernel), kernel)
    if _recordings:
        key = variant_key(kernel, args, kwargs)
        _variant_keys.add(key)
        for keys in _recordings:
            keys.add(key)
    runnable_kernel(kernel, device)[grid](*args, **kwargs)


@contextlib.contextmanager
def recording_variant_keys() -> Iterator[set[tuple]]:
    """Yields a set that receives the variant key of every launch made until the block ends."""
    keys: set[tuple] = set()
    _recordings.append(keys)
    try:
        yield keys
    finally:
        _recordings.remove(keys)


def variant_keys() -> set[tuple]:
    """Every variant key recorded in this process: (kernel name, one class per argument, options)."""
    return set(_variant_keys)


def num_compiled_variants() -> int:
    """Variants Triton has compiled (or loaded from its disk cache) for the kernels launched so far,
    summed over devices; 0 under the interpreter, which compiles nothing."""
    total = 0
    for kernel in _launched_kernels.values():
        if hasattr(kernel, "device_caches"):  # triton >= 3.2: device -> (kernel_cache, ...)
            total += sum(len(caches[0]) for caches in kernel.device_caches.values())
        else:  # triton 3.0, 3.1: device -> kernel_cache
            total += sum(len(cache) for cache in getattr(kernel, "cache", {}).values())
    return total


def variant_key(kernel: Any, args: tuple, kwargs: dict) -> tuple:
    """The key Triton compiles a launch under, as plain strings (see the section comment)."""
    params = _params_of(kernel)
    classes = []
    for index, (name, is_constexpr, is_specialized, is_aligned) in enumerate(params):
        value = args[index] if index < len(args) else kwargs[name]
        if is_constexpr:
            classes.append(f"{name}={value}")
        else:
            classes.append(f"{name}:{_argument_class(value, is_specialized, is_aligned)}")
    names = {name for name, *_ in params}
    options = tuple(sorted(f"{name}={value}" for name, value in kwargs.items() if name not in names))
    return (kernel.fn.__name__, tuple(classes), options)


def _argument_class(value: Any, is_specialized: bool, is_aligned: bool) -> str:
    """Triton's specialisation of one runtime argument: type, then 1 / D (divisible by 16) / nothing."""
    if isinstance(value, torch.Tensor):
        is_divisible = is_specialized and is_aligned and value.data_ptr() % 16 == 0
        return f"*{str(value.dtype).removeprefix('torch.')}" + (":D" if is_divisible else "")
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        kind = "i32" if -(2**31) <= value < 2**31 else "i64"
        if is_specialized and value == 1:
            return f"{kind}=1"
        return kind + (":D" if is_specialized and is_aligned and value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32"
    return type(value).__name__


def _params_of(kernel: Any) -> tuple[tuple[str, bool, bool, bool], ...]:
    """(name, is_constexpr, is_specialized, is_aligned) per parameter, from the kernel's decorator."""
    key = id(kernel)
    if key not in _kernel_params:
        options = getattr(kernel, "kwargs", None) or {}  # an InterpretedFunction keeps jit's options here
        not_specialized = set(getattr(kernel, "do_not_specialize", None) or options.get("do_not_specialize") or ())
        not_aligned = set(
            getattr(kernel, "do_not_specialize_on_alignment", None)
            or options.get("do_not_specialize_on_alignment") or ()
        )
        params = []
        for index, param in enumerate(inspect.signature(kernel.fn).parameters.values()):
            is_constexpr = "constexpr" in str(param.annotation)
            is_specialized = not {index, param.name} & not_specialized
            is_aligned = not {index, param.name} & not_aligned
            params.append((param.name, is_constexpr, is_specialized, is_aligned))
        _kernel_params[key] = tuple(params)
    return _kernel_params[key]
