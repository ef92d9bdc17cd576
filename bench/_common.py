"""What the engine benchmarks share: timing, copy bandwidth, matmul rate, the benchmark model, output.

Ceilings are measured in the same run as the thing they bound, on the same device:

    copy bandwidth  = (bytes read + bytes written) / time of one device-to-device copy
    matmul rate     = 2 n^3 / time of one n x n x n matmul in the benchmark dtype

CUDA timings of kernels use events (median of repeats); timings of engine calls use the wall
clock around a call that ends in a host synchronisation, so host overhead counts.
"""

from __future__ import annotations

import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from common.model.formats import DTYPE_NAMES

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def environment(device: torch.device) -> dict:
    """Versions and device, recorded with every result."""
    import triton
    import transformers

    return {"device": device_name(device), "torch": torch.__version__, "triton": triton.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def wall_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> dict:
    """Wall-clock milliseconds of `fn` (synchronised after each call): median, min, mean."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "mean_ms": statistics.fmean(times)}


def device_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median milliseconds of `fn` on the device: CUDA events around each call (CPU: wall clock)."""
    if device.type != "cuda":
        return wall_ms(fn, device, repeats, warmup)["median_ms"]
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure_copy_bandwidth(device: torch.device, num_mib: int, repeats: int = 20) -> dict:
    """Device-to-device copy of num_mib MiB: (read + written bytes) / time, the practical memory ceiling."""
    source = torch.randn(num_mib << 18, device=device)  # 4-byte elements
    target = torch.empty_like(source)
    ms = device_ms(lambda: target.copy_(source), device, repeats)
    moved = 2 * source.numel() * source.element_size()
    return {"mib": num_mib, "bytes": moved, "ms": ms, "gbps": moved / ms / 1e6}


def measure_matmul_rate(device: torch.device, size: int, dtype: torch.dtype, repeats: int = 20) -> dict:
    """size^3 matmul in `dtype`: 2 size^3 / time, the practical compute ceiling."""
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=generator)
    ms = device_ms(lambda: torch.matmul(a, b), device, repeats)
    return {"size": size, "dtype": str(dtype).removeprefix("torch."), "ms": ms, "tflops": 2 * size**3 / ms / 1e9}


def parameter_bytes(model: torch.nn.Module) -> dict:
    """Bytes of every parameter, and of those a forward reads whole (all but the embedding table,
    of which a step reads only its tokens' rows, unless the LM head shares it)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.model.embed_tokens.weight
    embedding_bytes = embedding.numel() * embedding.element_size()
    read_whole = total if model.lm_head is None else total - embedding_bytes
    return {"total": total, "read_whole": read_whole, "embedding": embedding_bytes}


def kv_bytes_per_token(model_config, dtype: torch.dtype) -> int:
    """K and V of one token in every layer."""
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * model_config.num_hidden_layers * model_config.num_key_value_heads * model_config.head_dim * element_size


def write_json(path: str | None, result: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n")


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """Right-aligned columns; floats with 4 significant digits."""
    def cell(value: object) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def require_device(name: str) -> torch.device:
    """The benchmark device; exits with a clear message when CUDA was asked for and is missing."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"--device {name} but no CUDA device is visible (use --device cpu for a functional run)")
    return device


def load_benchmark_model(model: str, device: torch.device, dtype: str, seed: int = 0):
    """(model, model_config) for --model (dummy:<preset> or a checkpoint), on `device` in `dtype`."""
    from common.attention import get_attention_backend
    from common.model.registry import resolve_model
    from common.model.weights import load_model

    resolved = resolve_model(model, "auto")
    backend = get_attention_backend("auto", device)
    return load_model(resolved.folder, resolved.load_format, dtype, device, backend,
                      model_config=resolved.model_config, seed=seed)


# ---- serving benchmarks: percentiles, arrivals, a streaming HTTP client -----------------------------


def percentiles(values, points: tuple[int, ...] = (50, 99)) -> dict[str, float | None]:
    """{"p50": ..., "p99": ...} of `values` (linear interpolation); None for each point when empty."""
    import numpy as np

    values = [float(v) for v in values]
    return {f"p{p}": float(np.percentile(values, p)) if values else None for p in points}


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """Send offsets in seconds: exponential gaps of mean 1/rate (seeded); rate inf -> all at 0."""
    import numpy as np

    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s (or inf), got {rate}")
    if rate == float("inf"):
        return [0.0] * num_requests
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, num_requests)
    return np.cumsum(gaps).tolist()


class HttpError(Exception):
    """A non-200 answer: `status` and the start of its body."""

    def __init__(self, status: int, body: str):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


async def _read_body_chunks(reader, headers: dict[str, str]):
    """The body as it arrives: de-chunked for `Transfer-Encoding: chunked`, else raw until EOF."""
    if "chunked" not in headers.get("transfer-encoding", ""):
        while data := await reader.read(65536):
            yield data
        return
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)  # CRLF after each chunk
        yield data


async def post_sse(host: str, port: int, path: str, body: dict):
    """POSTs `body` as JSON over HTTP/1.1 and yields (time.perf_counter() at arrival, event) for each
    server-sent `data:` event until `[DONE]`; raises HttpError on a non-200 status.

    A minimal client (one connection per request, `Connection: close`) so a benchmark needs no HTTP
    library beyond the standard one and times each event when its bytes arrive.
    """
    import asyncio

    reader, writer = await asyncio.open_connection(host, port)
    try:
        payload = json.dumps(body).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
                     .encode() + payload)
        await writer.drain()
        status = int((await reader.readline()).split()[1])
        headers = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        if status != 200:
            text = b"".join([chunk async for chunk in _read_body_chunks(reader, headers)])
            raise HttpError(status, text.decode(errors="replace"))
        buffer = b""
        async for chunk in _read_body_chunks(reader, headers):
            buffer += chunk
            now = time.perf_counter()
            *events, buffer = buffer.replace(b"\r\n", b"\n").split(b"\n\n")
            for event in events:
                for line in event.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    yield now, json.loads(data)
    finally:
        writer.close()
