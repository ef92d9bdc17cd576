"""Mixed steps: running decodes (one token each) first, then prompt chunks over earlier context, in one
packed step. The Triton backend runs the decode kernel on the leading rows and the prefill kernel on
the rest; both it and the reference backend's split must equal one unsplit causal attention over the
whole step (the reference's per-sequence loop), on the CPU (interpreter) and on CUDA."""

import pytest
import torch

from common.attention import triton_backend
from common.attention.backend import REFERENCE
from common.attention.metadata import AttentionMetadata
from common.attention.triton_backend import TRITON
from tests.helpers.devices import DEVICES
from tests.kernels.paged_cases import assert_matches_reference, build_paged_case

# (decode context lens, prompt chunks as (query_len, context_len)): ragged, chunks with prior context
STEPS = {
    "three-decodes-two-chunks": ([1, 17, 40], [(23, 23), (9, 50)]),
    "one-decode-one-chunk": ([70], [(33, 33)]),
    "decodes-then-one-token-chunk": ([5, 32], [(1, 12), (18, 18)]),
}


def mixed_case(step, device, dtype, head_dim, group, block_size, seed):
    decode_context_lens, chunks = STEPS[step]
    query_lens = [1] * len(decode_context_lens) + [query_len for query_len, _ in chunks]
    context_lens = decode_context_lens + [context_len for _, context_len in chunks]
    return build_paged_case(query_lens, context_lens, head_dim=head_dim, num_kv_heads=2, group=group,
                            block_size=block_size, dtype=dtype, seed=seed, device=device,
                            num_decode_seqs=len(decode_context_lens))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("step", sorted(STEPS))
@pytest.mark.parametrize(("dtype", "head_dim", "group", "block_size"), [
    (torch.float32, 64, 1, 16),
    (torch.float32, 128, 4, 8),
    (torch.bfloat16, 64, 3, 32),
])
def test_triton_mixed_step_matches_unsplit_attention(monkeypatch, device, step, dtype, head_dim, group, block_size):
    calls = []
    for name in ("paged_decode_attention", "prefill_attention"):
        real = getattr(triton_backend, name)
        monkeypatch.setattr(triton_backend, name,
                            lambda *args, real=real, name=name, **kwargs: calls.append(name) or real(*args, **kwargs))
    case = mixed_case(step, device, dtype, head_dim, group, block_size, seed=head_dim + group + block_size)
    assert case.metadata.is_mixed and not case.cpu_metadata.is_mixed
    out = TRITON.paged_attention(case.query, case.kv_cache, case.metadata, case.scale)
    assert calls == ["paged_decode_attention", "prefill_attention"]
    assert_matches_reference(out, case.reference())


@pytest.mark.parametrize("step", sorted(STEPS))
def test_reference_mixed_step_matches_unsplit_attention(step):
    case = mixed_case(step, "cpu", torch.float32, 64, 4, 16, seed=3)
    split = REFERENCE.paged_attention(case.query, case.clean_kv_cache, case.metadata, case.scale)
    torch.testing.assert_close(split, case.reference(), atol=2e-5, rtol=1e-4)


def test_metadata_parts_describe_their_own_rows():
    metadata = AttentionMetadata.build([1, 1, 5, 3], [4, 9, 12, 3], [[1], [2, 3, 4], [5, 6, 7], [8]], 4,
                                       num_decode_seqs=2)
    decode, prefill = metadata.decode_part, metadata.prefill_part
    assert metadata.num_decode_tokens == 2 and decode.is_decode and decode.max_context_len == 9
    assert decode.context_lens.tolist() == [4, 9] and decode.block_tables.shape[0] == 2
    assert prefill.query_start_locs.tolist() == [0, 5, 8] and prefill.context_lens.tolist() == [12, 3]
    assert prefill.slot_mapping.tolist() == metadata.slot_mapping[2:].tolist()
    assert prefill.block_tables.tolist() == [[5, 6, 7], [8, 0, 0]] and prefill.max_query_len == 5
    plain = AttentionMetadata.build([1, 5], [4, 12], [[1], [5, 6, 7]], 4)
    assert not plain.is_mixed and plain.num_decode_tokens == 0
    with pytest.raises(ValueError, match="num_decode_seqs"):
        AttentionMetadata.build([1, 5], [4, 12], [[1], [5, 6, 7]], 4, num_decode_seqs=2)


@pytest.mark.parametrize("device", DEVICES)
def test_uploaded_index_lists_keep_values_dtypes_and_16_byte_alignment(device):
    from common.attention.metadata import upload_index_lists

    fields = [([3, 1, 4], torch.int64), ([1, 5, 9, 2, 6], torch.int32), ([], torch.int64), ([5, 3, 5], torch.int64),
              ([8], torch.int32)]
    tensors = upload_index_lists(fields, device)
    for (values, dtype), tensor in zip(fields, tensors):
        assert tensor.device.type == device and tensor.dtype == dtype and tensor.cpu().tolist() == values
        assert tensor.data_ptr() % 16 == 0  # Triton compiles per pointer alignment: as a fresh tensor's
