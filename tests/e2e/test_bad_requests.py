"""Bad requests get INVALID_ARGUMENT naming the field, and every service stays healthy."""

import grpc
import pytest

from protos import generation_pb2 as g
from tests.e2e.cluster import is_serving


def _chat_with_unknown_field() -> g.GenerateRequest:
    message = g.ChatMessage(role="user", content="hi").SerializeToString() + bytes([0x48, 1])  # field 9 = 1
    request = g.GenerateRequest(chat=g.ChatMessages(messages=[g.ChatMessage.FromString(message)]))
    return g.GenerateRequest.FromString(request.SerializeToString())


CASES = {
    "empty prompt": ("text", g.GenerateRequest(text="")),
    "no prompt": ("prompt", g.GenerateRequest()),
    "prompt over max_model_len": ("text", g.GenerateRequest(text="hello " * 1100)),
    "negative temperature": ("sampling.temperature",
                             g.GenerateRequest(text="hi", sampling=g.SamplingParams(temperature=-0.1))),
    "top_p zero": ("sampling.top_p", g.GenerateRequest(text="hi", sampling=g.SamplingParams(top_p=0.0))),
    "top_p above one": ("sampling.top_p", g.GenerateRequest(text="hi", sampling=g.SamplingParams(top_p=1.01))),
    "max_tokens zero": ("sampling.max_tokens", g.GenerateRequest(text="hi", sampling=g.SamplingParams(max_tokens=0))),
    "unknown field in a message": ("chat.messages[0]", _chat_with_unknown_field()),
    "bad role": ("chat.messages[0].role", g.GenerateRequest(chat=g.ChatMessages(
        messages=[g.ChatMessage(role="wizard", content="hi")]))),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_request_is_invalid_argument_naming_the_field(stub, case):
    field, request = CASES[case]
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Generate(request, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(f"{field}:"), info.value.details()


def test_services_stay_healthy_and_serve_after_bad_requests(cluster, stub):
    assert all(is_serving(a) for a in [cluster.frontend, *cluster.prefill, *cluster.decode])
    responses = list(stub.Generate(g.GenerateRequest(text="Hi", sampling=g.SamplingParams(max_tokens=3)), timeout=120))
    assert responses[-1].HasField("final")
