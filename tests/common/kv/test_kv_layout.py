"""KVLayout: validation, sizes, dtype by name, mismatch descriptions, its one protobuf form."""

import pickle

import pytest
import torch

from common.kv.layout import KV_DTYPE_BYTES, KVLayout
from common.transfer.protocol import layout_from_pb, layout_to_pb
from protos import kv_layout_pb2

LAYOUT = KVLayout("org/Model;v=2 ü", "bfloat16", 16, 30, 3, 64)


def test_bytes_per_block_counts_layers_k_v_heads_and_dtype():
    # 2 (K, V) x 30 layers x 16 tokens x 3 heads x 64 channels x 2 bytes (bf16)
    assert LAYOUT.bytes_per_block == 2 * 30 * 16 * 3 * 64 * 2
    assert KVLayout("m", "float32", 8, 2, 1, 4).bytes_per_block == 2 * 2 * 8 * 1 * 4 * 4


@pytest.mark.parametrize("name", sorted(KV_DTYPE_BYTES))
def test_dtype_table_agrees_with_torch(name):
    layout = KVLayout("m", name, 4, 1, 1, 8)
    assert layout.torch_dtype.itemsize == KV_DTYPE_BYTES[name]
    assert layout.bytes_per_block == torch.empty(layout.block_shape(1), dtype=layout.torch_dtype).nbytes


def test_block_shape_puts_layers_then_k_v_then_blocks():
    assert LAYOUT.block_shape(5) == (30, 2, 5, 16, 3, 64)


def test_describe_mismatch_names_every_differing_field():
    other = KVLayout(LAYOUT.model_name, "float16", 32, 30, 3, 128)
    text = LAYOUT.describe_mismatch(other, "prefill", "decode")
    assert "block_size: prefill=16 decode=32" in text
    assert "head_dim: prefill=64 decode=128" in text
    assert "dtype: prefill=bfloat16 decode=float16" in text
    assert "num_layers" not in text
    assert LAYOUT.describe_mismatch(KVLayout(**vars(LAYOUT))) == ""


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(model_name=""), "model_name"),
        (dict(dtype="float17"), "dtype"),
        (dict(dtype="int8"), "dtype"),
        (dict(block_size=0), "block_size"),
        (dict(num_layers=-1), "num_layers"),
        (dict(num_kv_heads=2.0), "num_kv_heads"),
        (dict(head_dim=True), "head_dim"),
    ],
)
def test_bad_layout_field_raises_value_error_naming_it(kwargs, field):
    values = dict(vars(LAYOUT), **kwargs)
    with pytest.raises(ValueError, match=field):
        KVLayout(**values)


@pytest.mark.parametrize("dtype", ["torch.float16", torch.float16])
def test_dtype_is_stored_by_name_and_maps_to_torch(dtype):
    layout = KVLayout("m", dtype, 16, 1, 1, 8)
    assert layout.dtype == "float16" and layout.torch_dtype is torch.float16
    assert layout == KVLayout("m", "float16", 16, 1, 1, 8)


def test_protobuf_round_trip_keeps_every_field():
    message = layout_to_pb(LAYOUT)
    assert isinstance(message, kv_layout_pb2.KVLayout)
    assert (message.model_name, message.dtype, message.block_size) == (LAYOUT.model_name, "bfloat16", 16)
    assert layout_from_pb(kv_layout_pb2.KVLayout.FromString(message.SerializeToString())) == LAYOUT


def test_empty_or_malformed_protobuf_layout_raises_value_error_naming_the_field():
    with pytest.raises(ValueError, match="model_name"):
        layout_from_pb(kv_layout_pb2.KVLayout())
    malformed = layout_to_pb(LAYOUT)
    malformed.num_kv_heads = 0
    with pytest.raises(ValueError, match="num_kv_heads"):
        layout_from_pb(malformed)


def test_layout_crosses_processes_by_pickle():
    assert pickle.loads(pickle.dumps(LAYOUT)) == LAYOUT
