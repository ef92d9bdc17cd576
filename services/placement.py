"""Where `tandem serve` runs each worker, and how much of its GPU each worker may use.

    --device cuda | cuda:N | auto     every worker on that one GPU: each prefill worker gets 0.25 of it,
                                      the decode workers split the rest of 0.9 evenly
    --prefill-devices 0 --decode-devices 1 2
                                      each role round-robin over its own GPUs; every GPU is split among
                                      the workers it got as above (one role alone splits 0.9 evenly)
    --prefill-/--decode-gpu-memory-utilization X
                                      every worker of that role gets X wherever it runs
    --device cpu                      no GPU flags

`--gpu-memory-utilization` is a worker's share of its GPU's total memory (vLLM's per-instance
meaning), so the shares on one GPU add up to what the workers there use together. Pure functions of
the flags and the GPU count: nothing here starts a process or touches a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GPU_SHARE = 0.9  # what the workers on one GPU use together unless told otherwise
PREFILL_SHARE = 0.25  # a prefill worker's share of a GPU it shares with decode workers; its KV pool is small
ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class PlacementFlags:
    """`tandem serve`'s placement flags, parsed but not yet checked."""

    num_prefill: int = 1
    num_decode: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N: every worker there (without role device lists)
    prefill_devices: tuple[str, ...] = ()  # GPU indices ("0", "cuda:0"; "0,1" lists several)
    decode_devices: tuple[str, ...] = ()
    prefill_gpu_memory_utilization: float | None = None  # per prefill worker; None = the split above
    decode_gpu_memory_utilization: float | None = None  # per decode worker; None = the split above


@dataclass(frozen=True)
class WorkerPlacement:
    name: str  # "prefill-0"
    role: str  # "prefill" | "decode"
    device: str  # the worker's --device
    gpu_memory_utilization: float | None  # the worker's --gpu-memory-utilization; None: not on a GPU

    def argv(self) -> list[str]:
        argv = ["--device", self.device]
        if self.gpu_memory_utilization is not None:
            argv += ["--gpu-memory-utilization", f"{self.gpu_memory_utilization:g}"]
        return argv


def place_workers(flags: PlacementFlags, num_gpus: int | None) -> list[WorkerPlacement]:
    """Prefill workers then decode workers, each with its device and GPU share; ValueError (one
    line, naming the flag) for flags that cannot work. `num_gpus`: GPUs visible, None if unknown."""
    if flags.num_prefill < 1 or flags.num_decode < 1:
        raise ValueError("--num-prefill and --num-decode must be >= 1")
    for role in ROLES:
        share = getattr(flags, f"{role}_gpu_memory_utilization")
        if share is not None and not 0 < share <= 1:
            raise ValueError(f"--{role}-gpu-memory-utilization must be in (0, 1], got {share:g}")
    devices = _worker_devices(flags, num_gpus)
    names = [f"{role}-{i}" for role, count in zip(ROLES, (flags.num_prefill, flags.num_decode)) for i in range(count)]
    shares: dict[str, float | None] = {name: None for name in names}
    for device in dict.fromkeys(devices.values()):
        if device == "cpu" or (device == "auto" and num_gpus == 0):
            continue
        shares.update(_split_gpu(device, [name for name in names if devices[name] == device], flags))
    return [WorkerPlacement(name, name.split("-")[0], devices[name], shares[name]) for name in names]


def describe(placements: list[WorkerPlacement]) -> list[str]:
    """One line per GPU: 'GPU memory on cuda:0: prefill-0 0.25 + decode-0 0.65 = 0.9 of it'."""
    lines = []
    for device in dict.fromkeys(p.device for p in placements if p.gpu_memory_utilization is not None):
        here = [p for p in placements if p.device == device]
        parts = " + ".join(f"{p.name} {p.gpu_memory_utilization:g}" for p in here)
        total = sum(p.gpu_memory_utilization for p in here)
        lines.append(f"GPU memory on {device}: {parts} = {total:.4g} of it")
    return lines


def parse_gpu_indices(items: tuple[str, ...] | list[str], flag: str) -> list[int]:
    """['0', '1'], ['0,1'] or ['cuda:0'] -> [0, 1]."""
    indices = []
    for item in (part.strip() for text in items for part in text.split(",")):
        number = item.removeprefix("cuda:")
        if not number.isdigit():
            raise ValueError(f"{flag} takes GPU indices such as 0 or 0,1 or cuda:1, got {item!r}")
        indices.append(int(number))
    if not indices:
        raise ValueError(f"{flag} needs at least one GPU index")
    return indices


def _worker_devices(flags: PlacementFlags, num_gpus: int | None) -> dict[str, str]:
    """Worker name -> its --device."""
    if flags.device not in ("auto", "cpu", "cuda") and not _is_cuda_index(flags.device):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {flags.device!r}")
    if not flags.prefill_devices and not flags.decode_devices:
        if flags.device.startswith("cuda"):
            _check_visible([int(flags.device.partition(":")[2] or 0)], "--device", num_gpus)
        return {f"{role}-{i}": flags.device
                for role, count in zip(ROLES, (flags.num_prefill, flags.num_decode)) for i in range(count)}
    if not (flags.prefill_devices and flags.decode_devices):
        raise ValueError("--prefill-devices and --decode-devices go together (e.g. --prefill-devices 0 "
                         "--decode-devices 1)")
    if flags.device not in ("auto", "cuda"):
        raise ValueError(f"--device {flags.device} cannot be combined with --prefill-devices/--decode-devices")
    devices = {}
    for role, count in zip(ROLES, (flags.num_prefill, flags.num_decode)):
        indices = parse_gpu_indices(getattr(flags, f"{role}_devices"), f"--{role}-devices")
        _check_visible(indices, f"--{role}-devices", num_gpus)
        devices.update({f"{role}-{i}": f"cuda:{indices[i % len(indices)]}" for i in range(count)})
    return devices


def _split_gpu(device: str, names: list[str], flags: PlacementFlags) -> dict[str, float]:
    """Shares of one GPU for the workers on it (names are 'prefill-*' then 'decode-*')."""
    num_prefill = sum(name.startswith("prefill") for name in names)
    num_decode = len(names) - num_prefill
    prefill = flags.prefill_gpu_memory_utilization
    if prefill is None:
        prefill = PREFILL_SHARE if num_decode else _floor(GPU_SHARE / num_prefill)
    decode = flags.decode_gpu_memory_utilization
    if decode is None and num_decode:
        left = GPU_SHARE - num_prefill * prefill
        if left <= 0:
            raise ValueError(f"{num_prefill} prefill worker(s) x {prefill:g} on {device} leave nothing of "
                             f"{GPU_SHARE:g} for decode workers: set --decode-gpu-memory-utilization")
        decode = _floor(left / num_decode)
    total = num_prefill * prefill + num_decode * (decode or 0)
    if total > 1 + 1e-9:
        raise ValueError(f"the workers on {device} would use {total:.4g} of it: {num_prefill} prefill x "
                         f"{prefill:g} + {num_decode} decode x {decode or 0:g} > 1")
    return {name: prefill if name.startswith("prefill") else decode for name in names}


def _check_visible(indices: list[int], flag: str, num_gpus: int | None) -> None:
    if num_gpus is None:
        return
    missing = [index for index in indices if index >= num_gpus]
    if missing:
        raise ValueError(f"{flag}: GPU {missing[0]} is not visible ({num_gpus} GPU(s): 0..{num_gpus - 1})"
                         if num_gpus else f"{flag}: no GPU is visible")


def _is_cuda_index(device: str) -> bool:
    prefix, _, index = device.partition(":")
    return prefix == "cuda" and index.isdigit()


def _floor(share: float) -> float:
    """Rounded down to 4 decimals, so that printed shares never add up past the total."""
    return math.floor(share * 10_000 + 1e-9) / 10_000


# ---- colocated workers (`tandem serve --colocated`) ----------------------------------------------


def place_colocated_workers(num_workers: int, device: str, worker_devices: tuple[str, ...],
                            worker_gpu_memory_utilization: float | None, num_gpus: int | None) -> list[WorkerPlacement]:
    """`num_workers` colocated workers ("worker-0", ...): round-robin over `worker_devices` (GPU indices)
    when given, else all on `device`; the workers on one GPU split 0.9 of it evenly unless
    `worker_gpu_memory_utilization` gives each its share. ValueError (one line, naming the flag)."""
    if num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {num_workers}")
    share = worker_gpu_memory_utilization
    if share is not None and not 0 < share <= 1:
        raise ValueError(f"--worker-gpu-memory-utilization must be in (0, 1], got {share:g}")
    if worker_devices:
        if device not in ("auto", "cuda"):
            raise ValueError(f"--device {device} cannot be combined with --worker-devices")
        indices = parse_gpu_indices(worker_devices, "--worker-devices")
        _check_visible(indices, "--worker-devices", num_gpus)
        devices = [f"cuda:{indices[i % len(indices)]}" for i in range(num_workers)]
    else:
        if device not in ("auto", "cpu", "cuda") and not _is_cuda_index(device):
            raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {device!r}")
        if device.startswith("cuda"):
            _check_visible([int(device.partition(":")[2] or 0)], "--device", num_gpus)
        devices = [device] * num_workers
    placements = []
    for index, worker_device in enumerate(devices):
        is_on_gpu = worker_device != "cpu" and not (worker_device == "auto" and num_gpus == 0)
        num_here = devices.count(worker_device)
        if is_on_gpu and share is not None and num_here * share > 1 + 1e-9:
            raise ValueError(f"the workers on {worker_device} would use {num_here * share:.4g} of it: {num_here} "
                             f"x --worker-gpu-memory-utilization {share:g} > 1")
        gpu_share = (share if share is not None else _floor(GPU_SHARE / num_here)) if is_on_gpu else None
        placements.append(WorkerPlacement(f"worker-{index}", "worker", worker_device, gpu_share))
    return placements
