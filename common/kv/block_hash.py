"""Content hashes of full KV blocks, chained so that one hash names a block's whole prefix.

    tokens:  [ t0 .. t15 | t16 .. t31 | t32 .. t47 | t48 t49 ]      (block_size 16)
    hashes:    h0          h1           h2            (partial block: no hash)
    h0 = H(ROOT_HASH, t0..t15, extra_keys)   h1 = H(h0, t16..t31, extra_keys)   ...

Two blocks with the same hash hold the same KV: the same tokens at the same positions after the same
prefix. `extra_keys` (a tuple of ints, empty today) is where anything else that changes the KV joins
the key later. H is BLAKE2b over a fixed little-endian packing, never Python's `hash()`, so every
process (prefill and decode workers, a router) computes the same hashes whatever PYTHONHASHSEED is.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

BLOCK_HASH_BYTES = 16
ROOT_HASH = bytes(BLOCK_HASH_BYTES)  # the parent of a sequence's first block


def hash_block(parent_hash: bytes, token_ids: Sequence[int], extra_keys: tuple[int, ...] = ()) -> bytes:
    """H(parent_hash, token_ids, extra_keys): 16 bytes, the same in every process."""
    hasher = hashlib.blake2b(parent_hash, digest_size=BLOCK_HASH_BYTES)
    hasher.update(struct.pack(f"<I{len(token_ids)}q", len(token_ids), *token_ids))
    hasher.update(struct.pack(f"<I{len(extra_keys)}q", len(extra_keys), *extra_keys))
    return hasher.digest()


def extend_block_hashes(block_hashes: list[bytes], token_ids: Sequence[int], num_tokens: int,
                        block_size: int) -> None:
    """Appends to `block_hashes` the hashes of the full blocks among `token_ids[:num_tokens]` it lacks."""
    for block_index in range(len(block_hashes), num_tokens // block_size):
        parent = block_hashes[-1] if block_hashes else ROOT_HASH
        start = block_index * block_size
        block_hashes.append(hash_block(parent, token_ids[start:start + block_size]))


def full_block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chained hashes of every full block of `token_ids` (a partial last block has none)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    hashes: list[bytes] = []
    extend_block_hashes(hashes, token_ids, len(token_ids), block_size)
    return hashes


# Workers publish, and routers compare, the first 8 bytes of each block hash as an unsigned 64-bit int:
# half the bytes on the wire, and a collision (about 1 in 2**64 per pair) only misroutes a request,
# never serves wrong KV: the engine looks blocks up by the full 16 bytes.
ROUTING_KEY_BYTES = 8


def routing_key(block_hash: bytes) -> int:
    """A block hash shortened for routing: its first 8 bytes, little-endian, in [0, 2**64)."""
    return int.from_bytes(block_hash[:ROUTING_KEY_BYTES], "little")
