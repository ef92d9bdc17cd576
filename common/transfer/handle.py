"""What names an offered KV transfer and what a finished one measured: plain data, no torch.

The prefill worker returns a `KVHandle` to the frontend, which hands it to a decode worker
(`services/common/worker_messages.py` converts it to and from protobuf); the decode worker pulls
the blocks it names.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from common.kv.block_hash import BLOCK_HASH_BYTES
from common.kv.layout import KVLayout


TRANSFER_TIMEOUT_SECONDS = 30.0  # default: a pull completes, and its ack reaches the sender, within this
CONNECT_TIMEOUT_SECONDS = 5.0  # default: a receiver reaches a sender's listener within this


def new_transfer_id() -> str:
    """A random 128-bit transfer id as 32 lowercase hex chars."""
    return secrets.token_hex(16)


def check_transfer_id(transfer_id: str) -> None:
    is_hex = isinstance(transfer_id, str) and all(c in "0123456789abcdef" for c in transfer_id)
    if not (is_hex and len(transfer_id) == 32):
        raise ValueError(f"transfer_id: need 32 lowercase hex chars, got {transfer_id!r}")


def check_block_hashes(block_hashes: tuple[bytes, ...], num_tokens: int, block_size: int) -> None:
    """One 16-byte hash per full block of `num_tokens` tokens; raises ValueError naming block_hashes."""
    num_full_blocks = num_tokens // block_size
    if len(block_hashes) != num_full_blocks:
        raise ValueError(f"block_hashes: {len(block_hashes)} hashes, the {num_tokens} tokens fill "
                         f"{num_full_blocks} blocks of {block_size}")
    for block_hash in block_hashes:
        if not isinstance(block_hash, bytes) or len(block_hash) != BLOCK_HASH_BYTES:
            raise ValueError(f"block_hashes: each hash must be {BLOCK_HASH_BYTES} bytes, got {block_hash!r}")


def split_address(address: str) -> tuple[str, int]:
    """"host:port" -> (host, port); raises ValueError naming the address field."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address: expected 'host:port', got {address!r}")
    return host, int(port)


@dataclass(frozen=True)
class KVHandle:
    """What prefill returns to the frontend and decode needs to pull the KV (services map it to gRPC)."""

    transfer_id: str  # 32 hex chars, random 128 bits
    address: str  # the sender's "host:port"
    num_tokens: int  # prompt tokens whose KV the blocks hold
    num_blocks: int  # blocks the offer holds; the receiver pulls those it lacks
    layout: KVLayout  # the prefill pool's layout
    # Chained hashes of the full blocks (common/kv/block_hash.py), num_tokens // block_size of them, or
    # none when the sender names none (a receiver that reuses blocks then refuses the handle).
    block_hashes: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        check_transfer_id(self.transfer_id)
        if not self.address:
            raise ValueError("address: must not be empty")
        if self.num_blocks <= 0:
            raise ValueError(f"num_blocks: must be positive, got {self.num_blocks}")
        if self.num_tokens <= 0:
            raise ValueError(f"num_tokens: must be positive, got {self.num_tokens}")
        if not isinstance(self.layout, KVLayout):
            raise ValueError(f"layout: must be a KVLayout, got {type(self.layout).__name__}")
        object.__setattr__(self, "block_hashes", tuple(self.block_hashes))
        if self.block_hashes:
            check_block_hashes(self.block_hashes, self.num_tokens, self.layout.block_size)


@dataclass(frozen=True)
class TransferStats:
    """Measurements of one transfer, for spans (kv.bytes, kv.transport, kv.gbps) and metrics."""

    num_bytes: int  # KV bytes moved (0 when nothing was sent)
    num_blocks: int  # blocks moved
    seconds: float  # from pull request to data in place (receiver) / gather + send (sender)
    transport: str  # UCX transport that carried the data ("tcp", "cuda_ipc", "posix", ...), "fake" or "none"
    trace_context: dict[str, str] = field(default_factory=dict)  # this side's (from offer / begin)
    peer_trace_context: dict[str, str] = field(default_factory=dict)  # the pull's, seen by the sender
    num_reused_blocks: int = 0  # leading blocks of the offer the receiver already held (not moved)

    @property
    def gbps(self) -> float:
        return self.num_bytes * 8 / 1e9 / self.seconds if self.seconds > 0 else 0.0
