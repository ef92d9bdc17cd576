"""Block allocator: reference counts, typed errors, and property tests over random histories."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from common.kv.block_allocator import BlockAllocator, OutOfKVBlocks
from tests.common.kv.ownership import assert_ref_counts_match


def test_allocate_free_and_usage():
    allocator = BlockAllocator(8)
    first = allocator.allocate(3)
    second = allocator.allocate(5)
    assert len(set(first + second)) == 8
    assert allocator.num_free_blocks == 0 and allocator.usage == 1.0
    assert not allocator.can_allocate(1)
    allocator.free(first)
    assert allocator.num_free_blocks == 3 and allocator.usage == pytest.approx(5 / 8)
    assert sorted(allocator.allocate(3)) == sorted(first)


def test_out_of_blocks_is_typed_and_all_or_nothing():
    allocator = BlockAllocator(4)
    allocator.allocate(3)
    with pytest.raises(OutOfKVBlocks) as error:
        allocator.allocate(2)
    assert error.value.num_requested == 2 and error.value.num_free == 1
    assert allocator.num_free_blocks == 1


def test_double_free_raises_and_changes_nothing():
    allocator = BlockAllocator(4)
    block_ids = allocator.allocate(2)
    allocator.free(block_ids)
    with pytest.raises(ValueError, match="double free"):
        allocator.free(block_ids)
    assert allocator.num_free_blocks == 4
    held = allocator.allocate(1)
    with pytest.raises(ValueError, match="double free"):
        allocator.free(held + held)  # one holder, two drops
    assert allocator.ref_count(held[0]) == 1


def test_fork_keeps_block_until_last_holder_frees():
    allocator = BlockAllocator(2)
    block_ids = allocator.allocate(1)
    allocator.fork(block_ids)
    assert allocator.ref_count(block_ids[0]) == 2
    allocator.free(block_ids)
    assert allocator.num_free_blocks == 1
    allocator.free(block_ids)
    assert allocator.num_free_blocks == 2
    with pytest.raises(ValueError, match="not allocated"):
        allocator.fork(block_ids)


def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(0)
    allocator = BlockAllocator(2)
    with pytest.raises(ValueError, match="outside"):
        allocator.free([7])
    with pytest.raises(ValueError, match="num_blocks"):
        allocator.allocate(-1)


NUM_BLOCKS = 12


class AllocatorHistory(RuleBasedStateMachine):
    """Owners (sequences) allocate, grow block by block, fork (share), free and get preempted."""

    def __init__(self):
        super().__init__()
        self.allocator = BlockAllocator(NUM_BLOCKS)
        self.owners: list[list[int]] = []  # each owner's block table

    @rule(num_blocks=st.integers(0, 5))
    def allocate(self, num_blocks):
        if self.allocator.can_allocate(num_blocks):
            self.owners.append(self.allocator.allocate(num_blocks))
        else:
            with pytest.raises(OutOfKVBlocks):
                self.allocator.allocate(num_blocks)

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def append_block(self, data):
        owner = data.draw(st.sampled_from(self.owners))
        if self.allocator.can_allocate(1):
            owner += self.allocator.allocate(1)

    @precondition(lambda self: self.owners)
    @rule(data=st.data())
    def fork(self, data):
        owner = data.draw(st.sampled_from(self.owners))
        self.owners.append(self.allocator.fork(owner))

    @precondition(lambda self: self.owners)
    @rule(data=st.data(), is_double_free=st.booleans())
    def free_or_preempt(self, data, is_double_free):
        index = data.draw(st.integers(0, len(self.owners) - 1))
        block_ids = self.owners.pop(index)
        self.allocator.free(block_ids)
        still_held = {b for owner in self.owners for b in owner}
        if is_double_free and block_ids and block_ids[0] not in still_held:
            with pytest.raises(ValueError, match="double free"):
                self.allocator.free(block_ids[:1])

    @invariant()
    def counts_match_owners(self):
        holders = assert_ref_counts_match(self.allocator, self.owners, NUM_BLOCKS)
        assert self.allocator.num_free_blocks == NUM_BLOCKS - len(holders)

    def teardown(self):
        for owner in self.owners:
            self.allocator.free(owner)
        assert self.allocator.usage == 0.0
        assert sorted(self.allocator.allocate(NUM_BLOCKS)) == list(range(NUM_BLOCKS))  # all reusable


TestAllocatorHistory = AllocatorHistory.TestCase
TestAllocatorHistory.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
