"""Prefix cache and block hashes: chaining, process independence, revival, LRU eviction, fences."""

import os
import subprocess
import sys

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from common.kv.block_allocator import BlockAllocator
from common.kv.block_hash import ROOT_HASH, extend_block_hashes, hash_block
from common.kv.prefix_cache import PrefixCache
from tests.common.kv.ownership import assert_ref_counts_match

HASH_SCRIPT = "from common.kv.block_hash import hash_block, ROOT_HASH; print(hash_block(hash_block(ROOT_HASH, [1, 2, 3]), [70000, 5]).hex())"


def test_hashes_chain_over_the_whole_prefix():
    first = hash_block(ROOT_HASH, [1, 2, 3, 4])
    assert first == hash_block(ROOT_HASH, [1, 2, 3, 4]) and len(first) == 16
    assert hash_block(first, [5, 6, 7, 8]) != hash_block(hash_block(ROOT_HASH, [1, 2, 3, 9]), [5, 6, 7, 8])
    assert hash_block(ROOT_HASH, [1, 2]) != hash_block(ROOT_HASH, [1, 2], extra_keys=(0,))
    hashes: list[bytes] = []
    extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6, 7, 8, 9], 9, 4)  # two full blocks; the ninth token waits
    assert hashes == [first, hash_block(first, [5, 6, 7, 8])]
    extend_block_hashes(hashes, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 12, 4)
    assert len(hashes) == 3 and hashes[:2] == [first, hash_block(first, [5, 6, 7, 8])]


def test_hash_does_not_depend_on_the_process_or_its_hash_seed():
    here = hash_block(hash_block(ROOT_HASH, [1, 2, 3]), [70000, 5]).hex()
    for seed in ("1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        result = subprocess.run([sys.executable, "-c", HASH_SCRIPT], env=env, capture_output=True, text=True,
                                check=True, cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
                                    os.path.abspath(__file__))))))
        assert result.stdout.strip() == here


def cached_blocks(allocator, cache, num_blocks, seed=0):
    """Allocates `num_blocks` blocks, registers them under distinct hashes; returns (ids, hashes)."""
    block_ids = allocator.allocate(num_blocks)
    hashes = []
    for i, block_id in enumerate(block_ids):
        hashes.append(hash_block(ROOT_HASH, [seed, i]))
        assert cache.register(block_id, hashes[-1])
    return block_ids, hashes


def test_freed_cached_blocks_stay_findable_until_an_allocation_evicts_them_lru():
    allocator = BlockAllocator(4)
    cache = PrefixCache(allocator)
    block_ids, hashes = cached_blocks(allocator, cache, 3)
    assert cache.lookup(hashes) == block_ids
    allocator.free(block_ids[::-1])  # tail first: the tail is evicted first
    assert allocator.num_free_blocks == 4 and allocator.num_cached_free_blocks == 3 and allocator.usage == 0
    assert cache.lookup(hashes) == block_ids
    plain = allocator.allocate(1)  # the plain free block goes first
    assert plain[0] not in block_ids and cache.num_cached_blocks == 3
    evicted = allocator.allocate(1)
    assert evicted == [block_ids[2]] and cache.num_cached_blocks == 2 and cache.num_evicted_blocks == 1
    assert cache.lookup(hashes) == block_ids[:2]  # the chain stops at the evicted block
    assert allocator.fork(block_ids[:2]) == block_ids[:2]  # revived: held again, not free
    assert allocator.num_free_blocks == 0 and allocator.ref_count(block_ids[0]) == 1
    allocator.free(block_ids[:2] + plain + evicted)
    assert allocator.num_free_blocks == 4 and allocator.usage == 0
    assert sorted(allocator.allocate(4)) == [0, 1, 2, 3] and cache.num_cached_blocks == 0


def test_a_second_block_with_a_cached_hash_is_not_registered():
    allocator = BlockAllocator(4)
    cache = PrefixCache(allocator)
    block_ids, hashes = cached_blocks(allocator, cache, 1)
    twin = allocator.allocate(1)
    assert not cache.register(twin[0], hashes[0])
    allocator.free(twin)
    assert not allocator.is_cached(twin[0]) and allocator.num_cached_free_blocks == 0
    assert cache.lookup(hashes) == block_ids


def test_cached_blocks_freed_behind_a_fence_are_neither_allocated_nor_revived_until_it_is_released():
    allocator = BlockAllocator(3)
    cache = PrefixCache(allocator)
    block_ids, hashes = cached_blocks(allocator, cache, 2)
    allocator.set_fence(5)
    allocator.free(block_ids)
    assert allocator.num_fenced_blocks == 2 and allocator.num_free_blocks == 1
    assert cache.lookup(hashes) == [] and not allocator.can_allocate(2)
    with pytest.raises(ValueError, match="not allocated"):
        allocator.fork(block_ids[:1])
    allocator.set_fence(None)
    allocator.release_fence(5)
    assert allocator.num_cached_free_blocks == 2 and cache.lookup(hashes) == block_ids


def test_a_cache_serves_one_allocator_and_registers_only_held_blocks():
    allocator = BlockAllocator(2)
    cache = PrefixCache(allocator)
    with pytest.raises(ValueError, match="another prefix cache"):
        PrefixCache(allocator)
    with pytest.raises(ValueError, match="not allocated"):
        cache.register(0, hash_block(ROOT_HASH, [1]))


NUM_BLOCKS = 10


class CacheHistory(RuleBasedStateMachine):
    """Owners allocate (evicting cached blocks), register, reuse cached blocks, free behind fences."""

    def __init__(self):
        super().__init__()
        self.allocator = BlockAllocator(NUM_BLOCKS)
        self.cache = PrefixCache(self.allocator)
        self.owners: list[list[int]] = []
        self.hashes: list[bytes] = []  # every hash ever registered
        self.fence: int | None = None
        self.num_steps = 0

    @rule(num_blocks=st.integers(1, 4))
    def allocate(self, num_blocks):
        if self.allocator.can_allocate(num_blocks):
            self.owners.append(self.allocator.allocate(num_blocks))

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def register(self, data):
        owner = data.draw(st.sampled_from(self.owners))
        block_hash = hash_block(ROOT_HASH, [len(self.hashes)])
        if self.cache.register(owner[0], block_hash):
            self.hashes.append(block_hash)

    @precondition(lambda self: self.hashes)
    @rule(data=st.data())
    def reuse(self, data):
        block_hash = data.draw(st.sampled_from(self.hashes))
        found = self.cache.lookup([block_hash])
        if found:
            self.owners.append(self.allocator.fork(found))

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def free(self, data):
        self.allocator.free(self.owners.pop(data.draw(st.integers(0, len(self.owners) - 1))))

    @rule()
    def launch_or_complete(self):
        if self.fence is None:
            self.num_steps += 1
            self.fence = self.num_steps
            self.allocator.set_fence(self.fence)
        else:
            self.allocator.set_fence(None)
            self.allocator.release_fence(self.fence)
            self.fence = None

    @invariant()
    def held_blocks_are_never_free_and_counts_add_up(self):
        holders = assert_ref_counts_match(self.allocator, self.owners, NUM_BLOCKS)
        free = list(self.allocator._free_block_ids) + list(self.allocator._cached_free)
        assert len(free) == len(set(free)) and not set(free) & set(holders)
        assert len(free) + len(holders) + self.allocator.num_fenced_blocks == NUM_BLOCKS
        for block_hash in self.hashes:
            found = self.cache.lookup([block_hash])
            assert not found or self.allocator.is_cached(found[0])

    def teardown(self):
        for owner in self.owners:
            self.allocator.free(owner)
        if self.fence is not None:
            self.allocator.set_fence(None)
            self.allocator.release_fence(self.fence)
        assert self.allocator.usage == 0.0 and self.allocator.num_free_blocks == NUM_BLOCKS
        assert sorted(self.allocator.allocate(NUM_BLOCKS)) == list(range(NUM_BLOCKS))
        assert self.cache.num_cached_blocks == 0


TestCacheHistory = CacheHistory.TestCase
TestCacheHistory.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
