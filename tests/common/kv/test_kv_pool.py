"""KV pool: layer views alias the pool; gather/scatter round-trip blocks between two pools."""

import concurrent.futures

import pytest
import torch

from common.kv.kv_pool import KVPool, num_blocks_for_budget
from common.kv.layout import KVLayout
from tests.helpers.devices import DEVICES

LAYOUT = KVLayout(model_name="m", num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype="float32")


def test_shape_and_layer_view_alias_the_pool():
    pool = KVPool(LAYOUT, num_blocks=5)
    assert pool.kv.shape == (3, 2, 5, 4, 2, 8)
    pool.kv[1][0, 2].fill_(7.0)  # layer 1's view, as its attention reads it
    assert torch.all(pool.kv[1, 0, 2] == 7.0) and pool.kv[0].abs().sum() == 0


def test_gather_then_scatter_into_other_blocks_of_another_pool():
    source = KVPool(LAYOUT, num_blocks=6)
    source.kv.copy_(torch.randn_like(source.kv))
    gathered = source.gather_blocks([4, 1, 3])
    assert gathered.shape == (3, 2, 3, 4, 2, 8) and gathered.is_contiguous()
    target = KVPool(LAYOUT, num_blocks=8)
    target.scatter_blocks([0, 7, 2], gathered)
    assert torch.equal(target.kv[:, :, 0], source.kv[:, :, 4])
    assert torch.equal(target.kv[:, :, 7], source.kv[:, :, 1])
    assert torch.equal(target.kv[:, :, 2], source.kv[:, :, 3])
    assert target.kv[:, :, [1, 3, 4, 5, 6]].abs().sum() == 0
    source.kv.zero_()  # the gathered buffer is a copy, not a view
    assert gathered.abs().sum() > 0


def test_scatter_rejects_wrong_shape_dtype_and_ids():
    pool = KVPool(LAYOUT, num_blocks=4)
    with pytest.raises(ValueError, match="shape"):
        pool.scatter_blocks([0, 1], torch.zeros(3, 2, 1, 4, 2, 8))
    with pytest.raises(ValueError, match="dtype"):
        pool.scatter_blocks([0], torch.zeros(3, 2, 1, 4, 2, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="outside"):
        pool.gather_blocks([4])


def test_budget_sizing():
    # 2 (K,V) * 3 layers * 4 tokens * 2 heads * 8 dims * 4 bytes = 1536 bytes per block
    assert LAYOUT.bytes_per_block == 1536
    assert num_blocks_for_budget(LAYOUT, 1536 * 10 + 100) == 10
    assert KVPool(LAYOUT, num_blocks=3).num_bytes == 3 * LAYOUT.bytes_per_block


@pytest.mark.parametrize("device", DEVICES)
def test_gather_from_another_thread_is_complete_and_never_waits_for_the_compute_stream(device):
    pool = KVPool(LAYOUT, num_blocks=6, device=device)
    pool.kv.copy_(torch.randn(pool.kv.shape, device=device))
    expected = pool.kv[:, :, [5, 2]].clone()
    with concurrent.futures.ThreadPoolExecutor(1) as gather_thread:  # the KV sender gathers off the engine thread
        gather_thread.submit(pool.gather_blocks, [0]).result()  # as the warm-up does: kernels loaded, stream made
        if pool.device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda._sleep(2_000_000_000)  # ~1 s of busy compute stream, as a long prefill step would be
        gathered = gather_thread.submit(pool.gather_blocks, [5, 2]).result()
        if pool.device.type == "cuda":
            assert not torch.cuda.current_stream(pool.device).query(), "the gather waited for the compute stream"
        assert torch.equal(gathered, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_a_transfer_buffer_is_ready_only_once_the_kernels_queued_before_it_have_run(device):
    pool = KVPool(LAYOUT, num_blocks=6, device=device)
    if pool.kv.is_cuda:
        torch.cuda._sleep(200_000_000)  # a step still running on the compute stream, maybe on this memory
    buffer = pool.new_transfer_buffer(2)
    tensor = buffer.tensor
    assert tensor.shape == LAYOUT.block_shape(2) and tensor.dtype == LAYOUT.torch_dtype and tensor.device == pool.kv.device
    if pool.kv.is_cuda:
        assert not buffer.is_ready()
        torch.cuda.synchronize(pool.kv.device)
    assert buffer.is_ready()
    data = torch.randn(LAYOUT.block_shape(2))
    tensor.copy_(data)  # as a transfer would write it
    pool.scatter_blocks([4, 1], tensor)
    assert torch.equal(pool.kv[:, :, [4, 1]].cpu(), data)
