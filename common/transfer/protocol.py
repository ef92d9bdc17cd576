"""Control-message framing for the UCX hand-off (protos/kv_transfer.proto), validated before use, and
the KV layout's protobuf form (protos/kv_layout.proto), which the worker API carries too.

Every control message is one UCX message of exactly FRAME_BYTES, so a receiver always posts a
buffer of a known, small size and concurrent messages on one endpoint never interleave:

    | magic "TKV1" (4) | version u16 | reserved u16 | body_len u32 | ControlMessage (body_len) | zeros |

Nothing from the network is unpickled; bodies are protobuf and every field is checked here
before any KV-sized buffer is posted.
"""

from __future__ import annotations

import secrets
import struct
from dataclasses import dataclass, fields

from common.kv.layout import KVLayout
from common.transfer.errors import (
    KVInvalidPull,
    KVLayoutMismatch,
    KVSizeMismatch,
    KVTransferError,
    KVTransferNotFound,
)
from common.transfer.handle import KVHandle, check_transfer_id
from protos import kv_layout_pb2
from protos import kv_transfer_pb2 as pb

FRAME_BYTES = 4096
_HEADER = struct.Struct("<4sHHI")  # magic, version, reserved, body_len
_MAGIC = b"TKV1"
_VERSION = 1
MAX_BODY_BYTES = FRAME_BYTES - _HEADER.size
MAX_TRACE_ENTRIES = 16
MAX_REQUEST_TAG = 1 << 62

# Typed errors <-> wire codes; subclasses before KVTransferError, which is the catch-all.
_ERROR_CODES: list[tuple[type[KVTransferError], int]] = [
    (KVTransferNotFound, pb.ERROR_CODE_NOT_FOUND),
    (KVLayoutMismatch, pb.ERROR_CODE_LAYOUT_MISMATCH),
    (KVSizeMismatch, pb.ERROR_CODE_SIZE_MISMATCH),
    (KVInvalidPull, pb.ERROR_CODE_INVALID_REQUEST),
    (KVTransferError, pb.ERROR_CODE_INTERNAL),
]


class KVProtocolError(KVTransferError):
    """A control frame that is not a valid Tandem KV message."""


@dataclass(frozen=True)
class Pull:
    """A validated pull request (the domain form of tandem.kv.v1.PullRequest)."""

    transfer_id: str
    request_tag: int  # the pull response comes on this tag, the KV bytes on request_tag + 1
    layout: KVLayout  # the receiver's layout
    expected_num_blocks: int  # blocks to send: [first_block_index, first_block_index + expected_num_blocks)
    expected_bytes: int
    trace_context: dict[str, str]
    first_block_index: int = 0  # the offer's blocks before this one stay unsent (the receiver holds them)

    @property
    def response_tag(self) -> int:
        return self.request_tag

    @property
    def data_tag(self) -> int:
        return self.request_tag + 1


def new_request_tag() -> int:
    return secrets.randbelow(MAX_REQUEST_TAG - 2) + 1


def new_pull(handle: KVHandle, layout: KVLayout, trace_context: dict[str, str], first_block_index: int = 0) -> Pull:
    """The pull a receiver with `layout` sends for blocks [first_block_index, handle.num_blocks) of
    `handle`, on a fresh request tag."""
    num_blocks = handle.num_blocks - first_block_index
    return Pull(
        transfer_id=handle.transfer_id,
        request_tag=new_request_tag(),
        layout=layout,
        expected_num_blocks=num_blocks,
        expected_bytes=layout.bytes_per_block * num_blocks,
        trace_context=trace_context,
        first_block_index=first_block_index,
    )


def new_frame_buffer() -> bytearray:
    return bytearray(FRAME_BYTES)


def encode_frame(message: pb.ControlMessage) -> bytearray:
    body = message.SerializeToString()
    if len(body) > MAX_BODY_BYTES:
        raise KVProtocolError(f"control message of {len(body)} bytes exceeds {MAX_BODY_BYTES}")
    frame = new_frame_buffer()
    _HEADER.pack_into(frame, 0, _MAGIC, _VERSION, 0, len(body))
    frame[_HEADER.size : _HEADER.size + len(body)] = body
    return frame


def decode_frame(frame: bytes | bytearray | memoryview) -> pb.ControlMessage:
    if len(frame) != FRAME_BYTES:
        raise KVProtocolError(f"control frame of {len(frame)} bytes, expected {FRAME_BYTES}")
    magic, version, _, body_len = _HEADER.unpack_from(frame, 0)
    if magic != _MAGIC:
        raise KVProtocolError(f"bad control frame magic {magic!r}")
    if version != _VERSION:
        raise KVProtocolError(f"control frame version {version}, this side speaks {_VERSION}")
    if body_len > MAX_BODY_BYTES:
        raise KVProtocolError(f"control frame body_len {body_len} exceeds {MAX_BODY_BYTES}")
    message = pb.ControlMessage()
    try:
        message.ParseFromString(bytes(frame[_HEADER.size : _HEADER.size + body_len]))
    except Exception as error:  # protobuf raises DecodeError; any parse failure is a protocol error
        raise KVProtocolError(f"undecodable control message: {error}") from None
    if message.WhichOneof("body") is None:
        raise KVProtocolError("control message has no body")
    return message


def layout_to_pb(layout: KVLayout) -> kv_layout_pb2.KVLayout:
    """The one KVLayout message (protos/kv_layout.proto), for pull requests, KV handles and worker stats."""
    return kv_layout_pb2.KVLayout(**{f.name: getattr(layout, f.name) for f in fields(KVLayout)})


def layout_from_pb(message: kv_layout_pb2.KVLayout) -> KVLayout:
    """Raises ValueError naming the field on an empty or malformed layout."""
    return KVLayout(**{f.name: getattr(message, f.name) for f in fields(KVLayout)})


def pull_to_message(pull: Pull) -> pb.ControlMessage:
    message = pb.ControlMessage()
    request = message.pull_request
    request.transfer_id = pull.transfer_id
    request.request_tag = pull.request_tag
    request.layout.CopyFrom(layout_to_pb(pull.layout))
    request.expected_num_blocks = pull.expected_num_blocks
    request.expected_bytes = pull.expected_bytes
    request.trace_context.update(pull.trace_context)
    request.first_block_index = pull.first_block_index
    return message


def pull_from_message(request: pb.PullRequest) -> Pull:
    """Validates every field; raises KVInvalidPull naming the bad one."""
    try:
        check_transfer_id(request.transfer_id)
        layout = layout_from_pb(request.layout)
    except ValueError as error:
        raise KVInvalidPull(str(error)) from None
    if not 0 < request.request_tag < MAX_REQUEST_TAG:
        raise KVInvalidPull(f"request_tag: {request.request_tag} out of range")
    if request.expected_num_blocks <= 0:
        raise KVInvalidPull("expected_num_blocks: must be positive")
    if len(request.trace_context) > MAX_TRACE_ENTRIES:
        raise KVInvalidPull(f"trace_context: more than {MAX_TRACE_ENTRIES} entries")
    return Pull(
        transfer_id=request.transfer_id,
        request_tag=request.request_tag,
        layout=layout,
        expected_num_blocks=request.expected_num_blocks,
        expected_bytes=request.expected_bytes,
        trace_context=dict(request.trace_context),
        first_block_index=request.first_block_index,
    )


def response_ok(num_bytes: int) -> pb.ControlMessage:
    message = pb.ControlMessage()
    message.pull_response.ok = True
    message.pull_response.num_bytes = num_bytes
    return message


def response_error(error: KVTransferError) -> pb.ControlMessage:
    message = pb.ControlMessage()
    message.pull_response.ok = False
    message.pull_response.error_code = next(code for kind, code in _ERROR_CODES if isinstance(error, kind))
    message.pull_response.error_message = str(error)[: MAX_BODY_BYTES // 2]
    return message


def error_from_response(response: pb.PullResponse) -> KVTransferError:
    """The typed exception a refused pull raises on the decode side."""
    kind = next((kind for kind, code in _ERROR_CODES if code == response.error_code), KVTransferError)
    return kind(response.error_message or f"pull refused with error code {response.error_code}")


def ack_message(transfer_id: str, is_ok: bool) -> pb.ControlMessage:
    message = pb.ControlMessage()
    message.ack.transfer_id = transfer_id
    message.ack.ok = is_ok
    return message


def expect_body(message: pb.ControlMessage, body: str) -> None:
    kind = message.WhichOneof("body")
    if kind != body:
        raise KVProtocolError(f"expected a {body} control message, got {kind}")
