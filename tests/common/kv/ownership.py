"""Shared by the allocator's and the prefix cache's property tests: reference counts against the owners."""


def assert_ref_counts_match(allocator, owners, num_blocks: int) -> dict[int, int]:
    """Every block's reference count equals how many owners (lists of block ids) hold it; returns
    {block id: holders} of the held blocks."""
    holders: dict[int, int] = {}
    for owner in owners:
        for block_id in owner:
            holders[block_id] = holders.get(block_id, 0) + 1
    for block_id in range(num_blocks):
        assert allocator.ref_count(block_id) == holders.get(block_id, 0), block_id
    return holders
