"""The KV transfer interface: what prefill offers, what decode pulls, and how it can fail.

Both backends (`ucx.py` for real workers, `fake.py` for in-process tests) implement `KVSender` and
`KVReceiver` with identical semantics:

    prefill: sender.offer(id, block_ids, ...) -> KVHandle   (blocks held under a lease)
    decode:  ticket = receiver.begin(handle, destination, first_block_index=k)   (non-blocking)
             receiver.poll(ticket) -> PENDING | DONE | FAILED
    prefill: on_release(id, DONE | EXPIRED | FAILED | CANCELLED, stats)   (free the blocks here)

A transfer moves one request's blocks as one contiguous tensor
`[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]` (2 = K, V). A receiver that already
holds the first k blocks (its prefix cache has them) pulls only the rest:

    offer:  [ b0 | b1 | b2 | b3 | b4 ]        handle.num_blocks = 5
    pull:             [ b2 | b3 | b4 ]        first_block_index = 2: destination [L, 2, 3, BS, Hkv, D]
"""

from __future__ import annotations

import abc
import enum
import secrets
import threading
import urllib.parse
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Callable, Protocol, Union

import torch

from common.kv.block_hash import BLOCK_HASH_BYTES

if TYPE_CHECKING:
    from common.kv.kv_pool import TransferBuffer

TRANSFER_TIMEOUT_SECONDS = 30.0  # default: a pull completes, and its ack reaches the sender, within this
CONNECT_TIMEOUT_SECONDS = 5.0  # default: a receiver reaches a sender's listener within this


class TransferState(enum.Enum):
    """What `KVReceiver.poll` reports for a ticket."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


class TransferOutcome(enum.Enum):
    """Why the prefill side released an offer (its blocks can be freed in every case)."""

    DONE = "done"  # the receiver acked the data
    EXPIRED = "expired"  # nobody pulled before the lease ran out
    FAILED = "failed"  # a pull was refused (layout/size mismatch), the send failed or no ack came
    CANCELLED = "cancelled"  # cancel() or close() on the sender


class KVTransferError(Exception):
    """A KV hand-off failed; subclasses say why."""


class KVLayoutMismatch(KVTransferError):
    """Prefill and decode pools differ; the message names each differing field."""


class KVTransferNotFound(KVTransferError):
    """The sender has no live offer with this id (never offered, expired, cancelled or pulled)."""


class KVTransferTimeout(KVTransferError):
    """The transfer did not finish within its deadline."""


class KVSizeMismatch(KVTransferError):
    """The pull expects a different number of blocks than the offer holds."""


class KVInvalidPull(KVTransferError):
    """The pull request itself is malformed (bad id, byte count that does not match its layout, ...)."""


_LAYOUT_INT_FIELDS = ("block_size", "num_layers", "num_kv_heads", "head_dim")


def torch_dtype(name: str) -> torch.dtype:
    """Maps a dtype name such as "float16" (or "torch.float16") to the torch dtype."""
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype: unknown torch dtype {name!r}")
    return dtype


@dataclass(frozen=True)
class KVLayout:
    """Shape and type of a paged KV pool; two workers can hand off KV only if these match."""

    model_name: str  # served model, so two different models never exchange KV
    dtype: str  # torch dtype name, e.g. "float16"
    block_size: int  # tokens per block
    num_layers: int  # decoder layers holding KV
    num_kv_heads: int  # K/V heads per layer
    head_dim: int  # channels per head

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name: must not be empty")
        object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        torch_dtype(self.dtype)
        for name in _LAYOUT_INT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive int, got {value!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def bytes_per_block(self) -> int:
        """Bytes of one block across all layers, K and V."""
        elements = 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim
        return elements * self.torch_dtype.itemsize

    def transfer_shape(self, num_blocks: int) -> tuple[int, ...]:
        """Shape of a gathered transfer: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]."""
        return (self.num_layers, 2, num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def signature(self) -> str:
        """Stable one-line form for handles and logs; `from_signature` reads it back."""
        parts = [f"model_name={urllib.parse.quote(self.model_name, safe='')}", f"dtype={self.dtype}"]
        parts += [f"{name}={getattr(self, name)}" for name in _LAYOUT_INT_FIELDS]
        return ";".join(parts)

    @classmethod
    def from_signature(cls, signature: str) -> "KVLayout":
        values: dict[str, str] = {}
        for part in signature.split(";"):
            name, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"layout signature: malformed part {part!r}")
            values[name] = value
        expected = {f.name for f in fields(cls)}
        if set(values) != expected:
            raise ValueError(f"layout signature: fields {sorted(values)} != {sorted(expected)}")
        try:
            ints = {name: int(values[name]) for name in _LAYOUT_INT_FIELDS}
        except ValueError as error:
            raise ValueError(f"layout signature: {error}") from None
        return cls(urllib.parse.unquote(values["model_name"]), values["dtype"], **ints)

    @classmethod
    def from_pool(cls, pool_layout: object, model_name: str) -> "KVLayout":
        """From a pool's layout (common/kv/kv_pool.py: num_layers, block_size, num_kv_heads, head_dim, dtype)."""
        return cls(
            model_name=model_name,
            dtype=str(getattr(pool_layout, "dtype")),
            block_size=getattr(pool_layout, "block_size"),
            num_layers=getattr(pool_layout, "num_layers"),
            num_kv_heads=getattr(pool_layout, "num_kv_heads"),
            head_dim=getattr(pool_layout, "head_dim"),
        )

    def describe_mismatch(self, other: "KVLayout", self_name: str = "this", other_name: str = "other") -> str:
        """Empty when equal, else e.g. "block_size: prefill=16 decode=32; head_dim: prefill=64 decode=128"."""
        diffs = []
        for f in fields(self):
            mine, theirs = getattr(self, f.name), getattr(other, f.name)
            if mine != theirs:
                diffs.append(f"{f.name}: {self_name}={mine} {other_name}={theirs}")
        return "; ".join(diffs)


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


@dataclass(frozen=True)
class KVHandle:
    """What prefill returns to the frontend and decode needs to pull the KV (services map it to gRPC)."""

    transfer_id: str  # 32 hex chars, random 128 bits
    address: str  # the sender's "host:port"
    num_tokens: int  # prompt tokens whose KV the blocks hold
    num_blocks: int  # blocks the offer holds; the receiver pulls those it lacks
    layout_signature: str  # KVLayout.signature() of the prefill pool
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
        object.__setattr__(self, "block_hashes", tuple(self.block_hashes))
        if self.block_hashes:
            check_block_hashes(self.block_hashes, self.num_tokens, self.layout.block_size)

    @property
    def layout(self) -> KVLayout:
        return KVLayout.from_signature(self.layout_signature)


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


# Called once per offer by the sender, off the caller's thread; must not block (enqueue the free).
OnRelease = Callable[[str, TransferOutcome, TransferStats], None]


class KVBlockSource(Protocol):
    """The one thing a sender needs from a KV pool (common/kv/kv_pool.py provides it)."""

    def gather_blocks(self, block_ids: list[int]) -> torch.Tensor:
        """Contiguous copy [num_layers, 2, len(block_ids), block_size, num_kv_heads, head_dim],
        complete when it returns (UCX reads it outside any CUDA stream's order)."""
        ...


class TransferTicket:
    """One receive in flight; its state changes once, from PENDING to DONE or FAILED."""

    def __init__(self, handle: KVHandle, destination: torch.Tensor, first_block_index: int = 0) -> None:
        self.handle = handle
        self.destination = destination  # [L, 2, n, BS, Hkv, D], written in place
        self.first_block_index = first_block_index  # blocks [first_block_index, handle.num_blocks) are pulled
        self.error: KVTransferError | None = None
        self.stats: TransferStats | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()

    @property
    def transfer_id(self) -> str:
        return self.handle.transfer_id

    @property
    def state(self) -> TransferState:
        if not self._done.is_set():
            return TransferState.PENDING
        return TransferState.FAILED if self.error is not None else TransferState.DONE

    def set_done(self, stats: TransferStats) -> bool:
        """Backends call this once; returns False if the ticket had already finished."""
        with self._lock:
            if self._done.is_set():
                return False
            self.stats = stats
            self._done.set()
            return True

    def set_failed(self, error: KVTransferError) -> bool:
        with self._lock:
            if self._done.is_set():
                return False
            self.error = error
            self._done.set()
            return True

    def wait(self, timeout: float | None = None) -> TransferStats:
        """Blocks until finished; returns the stats or raises the ticket's typed error.

        Raises KVTransferTimeout if still pending after `timeout`; the transfer itself goes on
        until its own deadline, so keep the destination untouched until poll() leaves PENDING.
        """
        if not self._done.wait(timeout):
            raise KVTransferTimeout(f"transfer {self.transfer_id} still pending after {timeout}s")
        if self.error is not None:
            raise self.error
        assert self.stats is not None  # set together with _done
        return self.stats

    async def wait_async(self, timeout: float | None = None) -> TransferStats:
        """`wait` for asyncio callers (runs the blocking wait on a worker thread)."""
        import asyncio

        return await asyncio.to_thread(self.wait, timeout)


def split_address(address: str) -> tuple[str, int]:
    """"host:port" -> (host, port); raises ValueError naming the address field."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"address: expected 'host:port', got {address!r}")
    return host, int(port)


def check_first_block_index(handle: KVHandle, first_block_index: int) -> None:
    """A pull takes at least the offer's last block: 0 <= first_block_index < handle.num_blocks."""
    if isinstance(first_block_index, bool) or not isinstance(first_block_index, int) \
            or not 0 <= first_block_index < handle.num_blocks:
        raise ValueError(f"first_block_index: must be in [0, {handle.num_blocks - 1}], got {first_block_index!r}")


def check_destination(layout: KVLayout, handle: KVHandle, destination: torch.Tensor, first_block_index: int = 0) -> None:
    """The receiver writes raw bytes into `destination`, so its shape, dtype and layout must be exact:
    [L, 2, handle.num_blocks - first_block_index, BS, Hkv, D]."""
    split_address(handle.address)
    check_first_block_index(handle, first_block_index)
    expected = layout.transfer_shape(handle.num_blocks - first_block_index)
    if tuple(destination.shape) != expected:
        raise ValueError(f"destination: shape {tuple(destination.shape)} != expected {expected}")
    if destination.dtype != layout.torch_dtype:
        raise ValueError(f"destination: dtype {destination.dtype} != layout dtype {layout.torch_dtype}")
    if not destination.is_contiguous():
        raise ValueError("destination: must be contiguous")


# What a sender's gather callable returns: the gathered tensor, complete, or a buffer still being filled
# (a KVPool.start_gather TransferBuffer: `tensor`, and `is_ready()` once it may be read).
Gathered = Union[torch.Tensor, "TransferBuffer"]


def gathered_tensor(gathered: Gathered) -> torch.Tensor:
    """The tensor of a gather result, waiting for it to be complete."""
    if isinstance(gathered, torch.Tensor):
        return gathered
    if gathered.ready is not None:
        gathered.ready.synchronize()
    return gathered.tensor


def check_gathered(layout: KVLayout, num_blocks: int, gathered: torch.Tensor) -> None:
    """A sender refuses to ship a gather result that does not match its own layout."""
    expected = layout.transfer_shape(num_blocks)
    if tuple(gathered.shape) != expected or gathered.dtype != layout.torch_dtype:
        raise KVTransferError(
            f"gather_blocks returned {tuple(gathered.shape)} {gathered.dtype}, expected {expected} {layout.torch_dtype}"
        )
    if not gathered.is_contiguous():
        raise KVTransferError("gather_blocks returned a non-contiguous tensor")


def as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor (same memory), for sending or receiving raw bytes."""
    return tensor.reshape(-1).view(torch.uint8)


class KVSender(abc.ABC):
    """Prefill side: offers held blocks and serves pulls. Methods are thread-safe and never block long."""

    @property
    @abc.abstractmethod
    def address(self) -> str:
        """"host:port" that receivers connect to."""

    @abc.abstractmethod
    def offer(
        self,
        transfer_id: str,
        block_ids: list[int],
        num_tokens: int,
        lease_seconds: float,
        trace_context: dict[str, str] | None = None,
        block_hashes: tuple[bytes, ...] = (),
    ) -> KVHandle:
        """Holds `block_ids` for one pull until acked, cancelled or `lease_seconds` pass; the handle
        carries `block_hashes` (the full blocks' chained hashes) for receivers that reuse blocks."""

    @abc.abstractmethod
    def cancel(self, transfer_id: str) -> bool:
        """Releases an offer with CANCELLED; False if it was already released. Idempotent."""

    @property
    @abc.abstractmethod
    def num_pending(self) -> int:
        """Offers not released yet (offered or being pulled)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stops serving; every pending offer is released with CANCELLED before this returns."""


class KVReceiver(abc.ABC):
    """Decode side: pulls offered KV into caller-owned tensors. Methods are thread-safe and non-blocking."""

    def __init__(self, layout: KVLayout, timeout_seconds: float = TRANSFER_TIMEOUT_SECONDS,
                 connect_timeout_seconds: float = CONNECT_TIMEOUT_SECONDS) -> None:
        if timeout_seconds <= 0 or connect_timeout_seconds <= 0:
            raise ValueError("timeout_seconds and connect_timeout_seconds must be positive")
        self.layout = layout
        self._timeout_seconds = timeout_seconds
        self._connect_timeout_seconds = connect_timeout_seconds
        self._is_closed = False

    def _new_ticket(self, handle: KVHandle, destination: torch.Tensor, first_block_index: int) -> TransferTicket:
        """What every `begin` does first: refuse when closed, check the destination, open a ticket."""
        if self._is_closed:
            raise KVTransferError("receiver is closed")
        check_destination(self.layout, handle, destination, first_block_index)
        return TransferTicket(handle, destination, first_block_index)

    @abc.abstractmethod
    def begin(
        self,
        handle: KVHandle,
        destination: torch.Tensor,
        trace_context: dict[str, str] | None = None,
        first_block_index: int = 0,
    ) -> TransferTicket:
        """Starts pulling blocks [first_block_index, handle.num_blocks) of `handle` into `destination`
        [L, 2, n, BS, Hkv, D] (n = the blocks pulled); raises ValueError on a bad destination or index.

        The bytes land outside any CUDA stream's order: no queued kernel may still use `destination`'s
        memory (a `KVPool.new_transfer_buffer` once ready, or synchronize first)."""

    def poll(self, ticket: TransferTicket) -> TransferState:
        return ticket.state

    def wait(self, ticket: TransferTicket, timeout: float | None = None) -> TransferStats:
        return ticket.wait(timeout)

    @abc.abstractmethod
    def close(self) -> None:
        """Drops connections; transfers still in flight fail with KVTransferError."""
