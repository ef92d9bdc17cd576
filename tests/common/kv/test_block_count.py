import math

import pytest

from common.kv.block_count import num_blocks_for


@pytest.mark.parametrize("block_size", [1, 8, 16, 32])
def test_num_blocks_for_is_the_ceiling_of_tokens_over_block_size(block_size):
    for num_tokens in [0, 1, block_size - 1, block_size, block_size + 1, 5 * block_size + 3, 1_000_003]:
        assert num_blocks_for(num_tokens, block_size) == math.ceil(num_tokens / block_size)
