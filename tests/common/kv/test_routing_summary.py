"""What a worker publishes for cache-aware routing: routing keys of block hashes, and the cache's most
recently registered hashes (bounded, evictions gone)."""

from common.kv.block_allocator import BlockAllocator
from common.kv.block_hash import ROOT_HASH, full_block_hashes, extend_block_hashes, hash_block, routing_key
from common.kv.prefix_cache import PrefixCache


def test_block_hashes_cover_full_blocks_only_and_match_the_engines_chain():
    token_ids = list(range(100, 111))  # 11 tokens, block size 4: two full blocks
    expected: list[bytes] = []
    extend_block_hashes(expected, token_ids, len(token_ids), 4)
    assert full_block_hashes(token_ids, 4) == expected and len(expected) == 2
    assert full_block_hashes(token_ids[:3], 4) == []
    assert full_block_hashes(token_ids, 3)[0] != expected[0]


def test_routing_key_is_the_first_eight_bytes_little_endian():
    block_hash = bytes(range(1, 17))
    assert routing_key(block_hash) == int.from_bytes(bytes(range(1, 9)), "little")
    assert 0 <= routing_key(b"\xff" * 16) == 2**64 - 1


def test_recent_hashes_are_newest_first_bounded_and_lose_evicted_blocks():
    allocator = BlockAllocator(4)
    cache = PrefixCache(allocator)
    block_ids = allocator.allocate(3)
    hashes = [hash_block(ROOT_HASH, [i]) for i in range(3)]
    for block_id, block_hash in zip(block_ids, hashes):
        cache.register(block_id, block_hash)
    assert cache.recent_hashes(10) == hashes[::-1]
    assert cache.recent_hashes(2) == [hashes[2], hashes[1]]
    assert cache.recent_hashes(0) == []
    allocator.free(block_ids)  # block 0 freed first: evicted first once the plain free block is gone
    allocator.allocate(2)
    assert cache.recent_hashes(10) == [hashes[2], hashes[1]]
