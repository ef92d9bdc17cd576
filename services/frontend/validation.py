"""Public request -> validated domain objects (the frontend's `from_pb` edge).

Every rejection is an `InvalidRequest` whose message starts with the offending field's path, e.g.
`sampling.temperature: must be >= 0, got -1.0` or `chat.messages[1].role: must be one of ...`.
Token-level checks (prompt length against max_model_len) happen after tokenization, in `check_prompt_length`.
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass, field

from google.protobuf import unknown_fields
from google.protobuf.message import Message

from common.engine.sampling_params import ENGINE_FIELDS, SamplingParams
from protos import generation_pb2
from services.common.errors import InvalidRequest

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024  # each stop string (the matcher holds back up to this much text)
MAX_REQUEST_ID_LENGTH = 256
DEFAULT_MAX_PROMPT_CHARS = 1_000_000  # the frontend's --max-prompt-chars default


@dataclass(frozen=True)
class ChatTurn:
    role: str  # one of CHAT_ROLES
    content: str


@dataclass
class PromptInput:
    """Exactly one of text / chat / token_ids is set; `field_name` is the proto field it came from."""

    field_name: str  # "text" | "chat" | "token_ids"
    text: str | None = None
    chat: list[ChatTurn] | None = None
    token_ids: list[int] | None = None


@dataclass
class GenerateInput:
    request_id: str
    prompt: PromptInput
    sampling: SamplingParams  # max_tokens is shortened to the room left in the context after tokenization
    stop: list[str] = field(default_factory=list)  # stop strings (applied by the frontend only)


def reject_unknown_fields(message: Message, path: str = "") -> None:
    """Fails on fields this server does not know (a client built from a newer or a wrong schema)."""
    unknown = unknown_fields.UnknownFieldSet(message)
    if len(unknown):
        numbers = sorted({entry.field_number for entry in unknown})
        where = path or message.DESCRIPTOR.name
        raise InvalidRequest(where, f"unknown field number(s) {numbers} in {message.DESCRIPTOR.full_name}")
    for descriptor, value in message.ListFields():
        if descriptor.message_type is None:
            continue
        child = f"{path}.{descriptor.name}" if path else descriptor.name
        if descriptor.is_repeated:
            for index, item in enumerate(value):
                if isinstance(item, Message):
                    reject_unknown_fields(item, f"{child}[{index}]")
        else:
            reject_unknown_fields(value, child)


def _check_prompt_size(request: generation_pb2.GenerateRequest, kind: str, max_prompt_chars: int) -> None:
    """Refuses prompts over `max_prompt_chars` characters (token ids: that many ids) before any tokenization."""
    if kind == "text":
        size, what = len(request.text), "characters"
    elif kind == "chat":
        size, what = sum(len(message.content) for message in request.chat.messages), "characters in all messages"
    else:
        size, what = len(request.token_ids.ids), "token ids"
    if size > max_prompt_chars:
        field_name = {"text": "text", "chat": "chat.messages", "token_ids": "token_ids.ids"}[kind]
        raise InvalidRequest(field_name, f"prompt is {size} {what}, more than this server accepts ({max_prompt_chars})")


def parse_prompt(request: generation_pb2.GenerateRequest, vocab_size: int,
                 max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> PromptInput:
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise InvalidRequest("prompt", "one of text, chat or token_ids is required")
    _check_prompt_size(request, kind, max_prompt_chars)
    if kind == "text":
        if not request.text.strip():
            raise InvalidRequest("text", "prompt must not be empty")
        return PromptInput("text", text=request.text)
    if kind == "chat":
        messages = request.chat.messages
        if not messages:
            raise InvalidRequest("chat.messages", "must not be empty")
        turns = []
        for index, message in enumerate(messages):
            if message.role not in CHAT_ROLES:
                raise InvalidRequest(
                    f"chat.messages[{index}].role", f"must be one of {CHAT_ROLES}, got {message.role!r}"
                )
            turns.append(ChatTurn(message.role, message.content))
        if not any(turn.content.strip() for turn in turns):
            raise InvalidRequest("chat.messages", "every message is empty")
        return PromptInput("chat", chat=turns)
    token_ids = list(request.token_ids.ids)
    if not token_ids:
        raise InvalidRequest("token_ids.ids", "prompt must not be empty")
    for index, token_id in enumerate(token_ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidRequest(f"token_ids.ids[{index}]", f"{token_id} is outside [0, {vocab_size})")
    return PromptInput("token_ids", token_ids=token_ids)


# The engine fields generation.proto's SamplingParams carries, from the table of sampling parameters.
_PUBLIC_SAMPLING_FIELDS = tuple(row for row in ENGINE_FIELDS if row.generation is not None)


def _check_finite(pb: generation_pb2.SamplingParams) -> None:
    for row in _PUBLIC_SAMPLING_FIELDS:
        if row.scalar_type is float and pb.HasField(row.name) and not math.isfinite(getattr(pb, row.name)):
            raise InvalidRequest(f"sampling.{row.name}", f"must be a finite number, got {getattr(pb, row.name)}")


def _check_stop_strings(pb: generation_pb2.SamplingParams) -> None:
    if len(pb.stop) > MAX_STOP_STRINGS:
        raise InvalidRequest("sampling.stop", f"at most {MAX_STOP_STRINGS} stop strings, got {len(pb.stop)}")
    for index, stop in enumerate(pb.stop):
        if not stop:
            raise InvalidRequest(f"sampling.stop[{index}]", "stop strings must not be empty")
        if len(stop) > MAX_STOP_STRING_CHARS:
            raise InvalidRequest(f"sampling.stop[{index}]", f"at most {MAX_STOP_STRING_CHARS} characters, "
                                                            f"got {len(stop)}")


def _given_values(pb: generation_pb2.SamplingParams) -> dict:
    """The engine fields the request sets, and the frontend's value of those it leaves out."""
    values = {}
    for row in _PUBLIC_SAMPLING_FIELDS:
        if row.is_list:
            values[row.name] = list(getattr(pb, row.name))
        elif pb.HasField(row.name):
            values[row.name] = getattr(pb, row.name)
        elif row.request_default is not None:
            values[row.name] = row.request_default
    return values


def parse_sampling(pb: generation_pb2.SamplingParams, vocab_size: int,
                   max_tokens_limit: int | None = None) -> tuple[SamplingParams, list[str]]:
    """-> (engine SamplingParams, stop strings). `max_tokens_limit`: the most a request may ask for."""
    _check_finite(pb)
    if pb.HasField("max_tokens") and pb.max_tokens < 1:
        raise InvalidRequest("sampling.max_tokens", f"must be >= 1, got {pb.max_tokens}")
    if pb.HasField("max_tokens") and max_tokens_limit is not None and pb.max_tokens > max_tokens_limit:
        raise InvalidRequest("sampling.max_tokens", f"must be <= {max_tokens_limit} (this server's limit), "
                                                    f"got {pb.max_tokens}")
    for index, token_id in enumerate(pb.stop_token_ids):
        if not 0 <= token_id < vocab_size:
            raise InvalidRequest(f"sampling.stop_token_ids[{index}]", f"{token_id} is outside [0, {vocab_size})")
    _check_stop_strings(pb)
    try:
        sampling = SamplingParams(**_given_values(pb))
    except ValueError as exc:  # the engine's message starts with the field name
        message = str(exc)
        name = message.split(" ", 1)[0]
        raise InvalidRequest(f"sampling.{name}", message.split(" ", 1)[1] if " " in message else message) from exc
    return sampling, list(pb.stop)


def parse_generate_request(request: generation_pb2.GenerateRequest, vocab_size: int,
                           max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS,
                           max_tokens_limit: int | None = None) -> GenerateInput:
    """Validates everything that can be checked before tokenization (sizes first: nothing large is
    walked before it is known to be within the limits)."""
    reject_unknown_fields(request)
    request_id = request.request_id if request.HasField("request_id") else ""
    if len(request_id) > MAX_REQUEST_ID_LENGTH:
        raise InvalidRequest("request_id", f"at most {MAX_REQUEST_ID_LENGTH} characters")
    prompt = parse_prompt(request, vocab_size, max_prompt_chars)
    sampling, stop = parse_sampling(request.sampling, vocab_size, max_tokens_limit)
    return GenerateInput(request_id or uuid.uuid4().hex, prompt, sampling, stop)


def fit_to_context(request: GenerateInput, num_prompt_tokens: int, max_model_len: int) -> None:
    """Rejects prompts that leave no room to generate; shortens max_tokens to the room left."""
    room = max_model_len - num_prompt_tokens
    if room < 1:
        raise InvalidRequest(
            request.prompt.field_name,
            f"prompt is {num_prompt_tokens} tokens, longer than max_model_len {max_model_len} allows "
            "(at least 1 token must be left to generate)",
        )
    sampling = request.sampling
    if sampling.max_tokens > room:
        sampling.max_tokens = room
        sampling.min_tokens = min(sampling.min_tokens, room)
