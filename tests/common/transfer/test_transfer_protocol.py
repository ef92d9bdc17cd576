"""Control-message framing and validation: round trips, and hostile frames fail with a typed error."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.transfer import protocol
from common.transfer import (
    KVInvalidPull,
    KVLayout,
    KVLayoutMismatch,
    KVSizeMismatch,
    KVTransferError,
    KVTransferNotFound,
    new_transfer_id,
)

LAYOUT = KVLayout("m", "float16", 16, 2, 2, 8)


def _pull(**overrides) -> protocol.Pull:
    values = dict(
        transfer_id=new_transfer_id(),
        request_tag=protocol.new_request_tag(),
        layout=LAYOUT,
        expected_num_blocks=3,
        expected_bytes=3 * LAYOUT.bytes_per_block,
        trace_context={"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
    )
    values.update(overrides)
    return protocol.Pull(**values)


def test_pull_request_round_trips_through_a_fixed_size_frame():
    pull = _pull()
    frame = protocol.encode_frame(protocol.pull_to_message(pull))
    assert len(frame) == protocol.FRAME_BYTES
    message = protocol.decode_frame(frame)
    protocol.expect_body(message, "pull_request")
    assert protocol.pull_from_message(message.pull_request) == pull


@pytest.mark.parametrize(
    "error",
    [KVTransferNotFound("nope"), KVLayoutMismatch("block_size: prefill=16 decode=32"), KVSizeMismatch("n"),
     KVInvalidPull("bad"), KVTransferError("boom")],
)
def test_refusals_map_back_to_the_same_typed_error(error):
    message = protocol.decode_frame(protocol.encode_frame(protocol.response_error(error)))
    assert not message.pull_response.ok
    restored = protocol.error_from_response(message.pull_response)
    assert type(restored) is type(error) and str(restored) == str(error)


def test_ok_response_and_ack_round_trip():
    response = protocol.decode_frame(protocol.encode_frame(protocol.response_ok(12345))).pull_response
    assert response.ok and response.num_bytes == 12345
    transfer_id = new_transfer_id()
    ack = protocol.decode_frame(protocol.encode_frame(protocol.ack_message(transfer_id, False))).ack
    assert ack.transfer_id == transfer_id and not ack.ok


def test_oversized_message_is_refused_before_sending():
    pull = _pull(trace_context={"k": "x" * protocol.FRAME_BYTES})
    with pytest.raises(protocol.KVProtocolError, match="exceeds"):
        protocol.encode_frame(protocol.pull_to_message(pull))


def _corrupt(offset: int, fmt: str, value) -> bytearray:
    frame = protocol.encode_frame(protocol.response_ok(1))
    struct.pack_into(fmt, frame, offset, value)
    return frame


@pytest.mark.parametrize(
    "frame, match",
    [
        (_corrupt(0, "<4s", b"EVIL"), "magic"),
        (_corrupt(4, "<H", 9), "version"),
        (_corrupt(8, "<I", protocol.FRAME_BYTES), "body_len"),
        (bytes(100), "bytes, expected"),
        (protocol.encode_frame(protocol.pb.ControlMessage()), "no body"),
    ],
)
def test_malformed_frames_raise_protocol_error(frame, match):
    with pytest.raises(protocol.KVProtocolError, match=match):
        protocol.decode_frame(frame)


def test_wrong_message_kind_is_a_protocol_error():
    message = protocol.decode_frame(protocol.encode_frame(protocol.response_ok(1)))
    with pytest.raises(protocol.KVProtocolError, match="expected a pull_request"):
        protocol.expect_body(message, "pull_request")


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(transfer_id="not-hex"), "transfer_id"),
        (dict(layout=None), "model_name"),
        (dict(expected_num_blocks=0), "expected_num_blocks"),
        (dict(trace_context={str(i): "v" for i in range(protocol.MAX_TRACE_ENTRIES + 1)}), "trace_context"),
    ],
)
def test_invalid_pull_fields_raise_kv_invalid_pull_naming_the_field(overrides, field):
    message = protocol.pull_to_message(_pull(layout=LAYOUT))
    request = message.pull_request
    if "transfer_id" in overrides:
        request.transfer_id = overrides["transfer_id"]
    if "layout" in overrides:
        request.ClearField("layout")
    if "expected_num_blocks" in overrides:
        request.expected_num_blocks = 0
    if "trace_context" in overrides:
        request.trace_context.update(overrides["trace_context"])
    with pytest.raises(KVInvalidPull, match=field):
        protocol.pull_from_message(request)


def test_zero_request_tag_is_invalid():
    request = protocol.pull_to_message(_pull()).pull_request
    request.request_tag = 0
    with pytest.raises(KVInvalidPull, match="request_tag"):
        protocol.pull_from_message(request)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=protocol.FRAME_BYTES - 12))
def test_random_bodies_either_decode_or_raise_protocol_error(body):
    frame = protocol.new_frame_buffer()
    struct.pack_into("<4sHHI", frame, 0, b"TKV1", 1, 0, len(body))
    frame[12 : 12 + len(body)] = body
    try:
        message = protocol.decode_frame(frame)
    except protocol.KVProtocolError:
        return
    assert message.WhichOneof("body") is not None
