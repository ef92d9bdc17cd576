"""Public request validation: every rejection names the field it is about."""

import pytest

import protos  # noqa: F401  (builds the stubs)
from protos import generation_pb2 as g
from services.common.errors import InvalidRequest
from services.frontend.validation import fit_to_context, parse_generate_request

VOCAB_SIZE = 1000


def _request(**sampling) -> g.GenerateRequest:
    return g.GenerateRequest(text="Hello", sampling=g.SamplingParams(**sampling))


@pytest.mark.parametrize(
    ("request_pb", "field"),
    [
        (g.GenerateRequest(), "prompt"),
        (g.GenerateRequest(text="   "), "text"),
        (g.GenerateRequest(chat=g.ChatMessages()), "chat.messages"),
        (g.GenerateRequest(chat=g.ChatMessages(messages=[g.ChatMessage(role="robot", content="hi")])),
         "chat.messages[0].role"),
        (g.GenerateRequest(token_ids=g.TokenIds()), "token_ids.ids"),
        (g.GenerateRequest(token_ids=g.TokenIds(ids=[1, VOCAB_SIZE])), "token_ids.ids[1]"),
        (_request(temperature=-0.5), "sampling.temperature"),
        (_request(top_p=0.0), "sampling.top_p"),
        (_request(top_p=1.5), "sampling.top_p"),
        (_request(max_tokens=0), "sampling.max_tokens"),
        (_request(min_p=2.0), "sampling.min_p"),
        (_request(top_k=-5), "sampling.top_k"),
        (_request(temperature=float("nan")), "sampling.temperature"),
        (_request(logprobs=21), "sampling.logprobs"),
        (_request(max_tokens=4, min_tokens=5), "sampling.min_tokens"),
        (_request(stop=["ok", ""]), "sampling.stop[1]"),
        (_request(stop_token_ids=[VOCAB_SIZE + 3]), "sampling.stop_token_ids[0]"),
    ],
)
def test_bad_requests_name_the_field(request_pb, field):
    with pytest.raises(InvalidRequest) as info:
        parse_generate_request(request_pb, VOCAB_SIZE)
    assert str(info.value).startswith(f"{field}:"), str(info.value)
    assert info.value.field == field


def test_unknown_field_in_a_chat_message_is_rejected():
    message = g.ChatMessage(role="user", content="hi").SerializeToString() + bytes([0x38, 5])  # field 7
    request = g.GenerateRequest(chat=g.ChatMessages(messages=[g.ChatMessage.FromString(message)]))
    with pytest.raises(InvalidRequest) as info:
        parse_generate_request(g.GenerateRequest.FromString(request.SerializeToString()), VOCAB_SIZE)
    assert info.value.field == "chat.messages[0]"
    assert "7" in str(info.value)


def test_unset_fields_take_defaults_and_zero_is_kept():
    parsed = parse_generate_request(_request(temperature=0.0, seed=0), VOCAB_SIZE)
    assert parsed.sampling.temperature == 0.0  # explicit 0 is greedy, not "unset"
    assert parsed.sampling.seed == 0
    assert parsed.sampling.top_p == 1.0 and parsed.sampling.max_tokens == 256
    assert len(parsed.request_id) == 32  # made up when missing


def test_prompt_longer_than_context_is_rejected_and_max_tokens_fits_the_rest():
    parsed = parse_generate_request(_request(max_tokens=100, min_tokens=50), VOCAB_SIZE)
    with pytest.raises(InvalidRequest) as info:
        fit_to_context(parsed, num_prompt_tokens=64, max_model_len=64)
    assert info.value.field == "text" and "max_model_len" in str(info.value)
    fit_to_context(parsed, num_prompt_tokens=40, max_model_len=64)
    assert parsed.sampling.max_tokens == 24 and parsed.sampling.min_tokens == 24
