"""Says in the log which transport UCX picked for KV, once per transport and memory type, and warns
loudly when GPU KV goes over TCP.

Across hosts UCX takes RDMA (rc, dc, ud: InfiniBand or RoCE) when the pod or host has a device for it,
and TCP otherwise. Over TCP every GPU block is staged through host memory and the kernel's socket
stack: a hand-off that takes milliseconds over RDMA or CUDA IPC takes tens to hundreds, and the decode
worker's time to token #2 grows with it. Nothing fails, so the warning is the only sign.
"""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("tandem.kv.transport")

_TCP_TRANSPORTS = ("tcp", "sockcm")
_lock = threading.Lock()
_reported: set[tuple[str, str]] = set()


def is_tcp(transport: str) -> bool:
    """Whether UCX's description ("rc_mlx5", "cuda_copy+tcp", ...) names a TCP transport for the data."""
    return any(name in _TCP_TRANSPORTS for name in transport.split("+"))


def report_transport(transport: str, memory_type: str) -> bool:
    """Logs the transport of KV in `memory_type` memory ("cuda" | "host") the first time it is seen in
    this process: INFO, or a WARNING for GPU memory over TCP. True when this call logged."""
    key = (transport, memory_type)
    with _lock:
        if key in _reported:
            return False
        _reported.add(key)
    if memory_type == "cuda" and is_tcp(transport):
        logger.warning(
            "!!! KV between GPUs goes over TCP (UCX transport %s) !!! Every hand-off is staged through host "
            "memory and sockets, many times slower than RDMA or CUDA IPC. Give the workers an RDMA device "
            "(docs/kubernetes.md, 'UCX across hosts') or place prefill and decode on one host.", transport)
    else:
        logger.info("KV hand-offs of %s memory use UCX transport %s", memory_type, transport)
    return True


def forget_reported() -> None:
    """Tests: every transport counts as unseen again."""
    with _lock:
        _reported.clear()
