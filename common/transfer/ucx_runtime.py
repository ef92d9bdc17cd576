"""One asyncio event loop per process that owns every ucxx call, plus endpoint transport discovery.

ucxx keeps a single UCX context and worker per process, and its progress (a thread of its own, the
ucxx default) is started once per event loop. Two loops would start two progress threads on one
worker, so every sender and receiver of a process shares this loop instead of owning one: their
public methods stay synchronous and thread-safe by submitting coroutines here.

UCX is initialised lazily in the process that first uses it; processes must be started with
`spawn` (or before first use), because a UCX context does not survive fork.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import logging
import os
import re
import threading
import weakref
from typing import Any, Coroutine

from common.transfer.transport_report import report_transport

logger = logging.getLogger(__name__)


def prefer_busy_progress() -> None:
    """Makes UCX's progress thread poll instead of sleeping in epoll (unless UCXPY_PROGRESS_MODE is set).

    For GPU workers: a cuda_ipc copy's completion raises no event, so a sleeping progress thread sees
    each step of a hand-off (rendezvous, data, acks) only at its next 1 ms epoll timeout, which added
    ~5 ms to every pull. The polling thread is native code and holds no GIL, so it costs one CPU core
    and nothing else. Must run before UCX starts in this process (`UcxRuntime.get()`).
    """
    os.environ.setdefault("UCXPY_PROGRESS_MODE", "thread-polling")


class UcxRuntime:
    """The process-wide loop thread; get it with `UcxRuntime.get()`."""

    _instance: "UcxRuntime | None" = None
    _instance_lock = threading.Lock()

    cuda_device_index: int | None = None  # the worker's GPU (bind_cuda_device), current on UCX's thread

    def __init__(self) -> None:
        self._pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="kv-ucx-loop", daemon=True)
        self._thread.start()
        self.ucxx = self.run(self._import_ucxx(), timeout=60)

    def _run_loop(self) -> None:
        # A thread starts with no current GPU, and CUDA (UCX's transports, ucxx's buffers) then opens a
        # context on GPU 0: half a GiB on another worker's GPU. Make the worker's own GPU current here.
        if self.cuda_device_index is not None:
            import torch

            torch.cuda.set_device(self.cuda_device_index)
        self.loop.run_forever()

    @classmethod
    def bind_cuda_device(cls, index: int) -> None:
        """UCX's thread, once started, uses GPU `index` (call before the first transfer)."""
        cls.cuda_device_index = index

    @classmethod
    def get(cls) -> "UcxRuntime":
        with cls._instance_lock:
            if cls._instance is not None and cls._instance._pid != os.getpid():
                raise RuntimeError("UCX was initialised before fork; start workers with the 'spawn' method")
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    @staticmethod
    async def _import_ucxx() -> Any:
        # ucxx sets UCX_MEMTYPE_CACHE, which UCX >= 1.19 no longer knows and warns about.
        os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
        # Idle CPU: complete requests through Python futures instead of polling them on this loop.
        # Without it an idle process with one open endpoint spins the loop at ~50% of a core (measured
        # on CPU over tcp), which halves decode speed on small machines. ucxx reads it when the
        # context is created just below; an explicit setting in the environment wins.
        os.environ.setdefault("UCXPY_ENABLE_PYTHON_FUTURE", "1")
        import ucxx

        ucxx.core._get_ctx()  # create the context inside this loop, so its progress binds here
        return ucxx

    def submit(self, coroutine: Coroutine) -> concurrent.futures.Future:
        """Schedules a coroutine on the loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine, timeout: float | None = None) -> Any:
        """Runs a coroutine on the loop and waits for its result (never call from the loop itself)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("UcxRuntime.run called from the UCX loop thread; await the coroutine instead")
        return self.submit(coroutine).result(timeout)


def ucx_buffer(tensor: Any) -> Any:
    """What ucxx sends from / receives into: CUDA tensors as they are, CPU ones as numpy views."""
    return tensor if tensor.is_cuda else tensor.numpy()


# ---------------------------------------------------------------------------------------------
# Which transport carries the data: parsed from UCX's own description of the endpoint.

_transport_cache: "weakref.WeakKeyDictionary[Any, dict[str, str]]" = weakref.WeakKeyDictionary()


def endpoint_transport(endpoint: Any, memory_type: str) -> str:
    """The transport UCX uses for large tagged sends of `memory_type` ("host"/"cuda") on this endpoint.

    Reads `ucp_ep_print_info`: the row for unbounded message sizes of the tagged-send table, or,
    when that table is not built yet, the transports of the endpoint's bulk-data (rma_bw) lanes. The
    first time a transport is seen it is logged (a loud warning for GPU memory over TCP).
    """
    known = _transport_cache.setdefault(endpoint, {})
    if memory_type not in known:
        try:
            known[memory_type] = parse_transport(_ucp_endpoint_info(endpoint.ucp_endpoint), memory_type)
        except Exception:  # diagnostics only: never fail a transfer over it
            logger.debug("could not read UCX endpoint info", exc_info=True)
            known[memory_type] = "unknown"
        report_transport(known[memory_type], memory_type)
    return known[memory_type]


def parse_transport(info: str, memory_type: str) -> str:
    table = _tag_send_table_transport(info, memory_type)
    if table:
        return table
    lanes = []
    for match in re.finditer(r"lane\[\d+\]:\s+\d+:([a-z0-9_]+)/\S+.*rma_bw", info):
        if match.group(1) not in lanes:
            lanes.append(match.group(1))
    if memory_type == "cuda" and "cuda_ipc" in lanes:
        return "cuda_ipc"
    return "+".join(lanes) or "unknown"


def _tag_send_table_transport(info: str, memory_type: str) -> str:
    lines = info.splitlines()
    title = f"tagged message by ucp_tag_send* from {memory_type} memory"
    for start, line in enumerate(lines):
        if title not in line:
            continue
        for row in lines[start + 1 :]:
            cells = [cell.strip() for cell in row.strip("# ").strip("|").split("|")]
            if len(cells) >= 3 and cells[0].endswith("inf"):
                names = [part.split("/")[0] for part in cells[-1].split(",")]
                return "+".join(dict.fromkeys(name.strip() for name in names if name.strip()))
            if not row.lstrip("# ").startswith(("|", "+")):
                break
        break
    return ""


def _ucp_endpoint_info(ucp_endpoint: int) -> str:
    """Captures `ucp_ep_print_info(ep, FILE*)` through libc's tmpfile (UCX only prints to a FILE*)."""
    libucp = _libucp()
    libc = ctypes.CDLL(None)
    libc.tmpfile.restype = ctypes.c_void_p
    for name in ("fflush", "rewind", "fclose"):
        getattr(libc, name).argtypes = [ctypes.c_void_p]
    libc.fread.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_void_p]
    libc.fread.restype = ctypes.c_size_t
    libucp.ucp_ep_print_info.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    stream = libc.tmpfile()
    if not stream:
        raise OSError("tmpfile() failed")
    try:
        libucp.ucp_ep_print_info(ctypes.c_void_p(ucp_endpoint), ctypes.c_void_p(stream))
        libc.fflush(stream)
        libc.rewind(stream)
        chunks = []
        buffer = ctypes.create_string_buffer(1 << 16)
        while (count := libc.fread(buffer, 1, len(buffer), stream)) > 0:
            chunks.append(buffer.raw[:count])
        return b"".join(chunks).decode(errors="replace")
    finally:
        libc.fclose(stream)


def _libucp() -> ctypes.CDLL:
    with open("/proc/self/maps") as maps:
        for line in maps:
            path = line.split()[-1]
            if os.path.basename(path).startswith("libucp.so"):
                return ctypes.CDLL(path)
    return ctypes.CDLL("libucp.so.0")
