"""The table of sampling parameters drives every place a parameter appears: a row that one of them
misses (a proto, validation, conversion to or from protobuf, the OpenAI schema) fails here."""

from __future__ import annotations

import pytest

from common.engine.sampling_params import ENGINE_FIELDS, SAMPLING_FIELDS, SamplingParams
from protos import generation_pb2, worker_pb2
from common.engine.sampling_protos import MESSAGE_FILES, render_message, rendered_file
from services.common.errors import InvalidRequest
from services.common.worker_messages import sampling_from_pb, sampling_to_pb
from services.frontend.openai.convert import completion_requests, public_param
from services.frontend.openai.protocol import ChatCompletionRequest, CompletionRequest
from services.frontend.validation import parse_sampling

VOCAB_SIZE = 100
# Per row: a valid value other than the default (exact in float32, so it survives the protos), and a value
# the table's bounds refuse (None: any value of the type is valid). A new row needs its line here.
EXAMPLES = {
    "temperature": (0.5, -1.0),
    "top_p": (0.5, 1.5),
    "top_k": (5, -5),
    "min_p": (0.25, 2.0),
    "repetition_penalty": (1.25, 0.0),
    "frequency_penalty": (0.5, 2.5),
    "presence_penalty": (-0.5, -2.5),
    "seed": (7, None),
    "max_tokens": (32, 0),
    "min_tokens": (3, 10_000),
    "stop_token_ids": ([3, 5], [-1]),
    "ignore_eos": (True, None),
    "logprobs": (2, 21),
    "num_output_tokens_before": (2, 10_000),
    "stop": (["END"], None),
}
ENGINE_NAMES = [row.name for row in ENGINE_FIELDS]
PUBLIC_ENGINE_NAMES = [row.name for row in ENGINE_FIELDS if row.generation is not None]
OPENAI_ROWS = [row for row in SAMPLING_FIELDS if row.openai]


def _row(name):
    return next(row for row in SAMPLING_FIELDS if row.name == name)


def _set_pb(pb, name, value):
    if isinstance(value, list):
        getattr(pb, name).extend(value)
    else:
        setattr(pb, name, value)


def test_every_row_has_examples_and_every_field_has_a_row():
    assert sorted(EXAMPLES) == sorted(row.name for row in SAMPLING_FIELDS)
    assert [row.name for row in ENGINE_FIELDS] == list(SamplingParams.__dataclass_fields__)
    for name, (valid, _) in EXAMPLES.items():
        assert valid != _row(name).default, name


@pytest.mark.parametrize("api", sorted(MESSAGE_FILES))
def test_protos_are_written_from_the_table(api):
    assert MESSAGE_FILES[api].read_text() == rendered_file(api), (
        f"{MESSAGE_FILES[api].name} differs from the table of sampling parameters: run `python -m common.engine.sampling_protos`")


@pytest.mark.parametrize("api, message", [("generation", generation_pb2.SamplingParams),
                                          ("worker", worker_pb2.SamplingParams)])
def test_built_stubs_carry_exactly_the_rows_of_their_api(api, message):
    expected = {row.name: getattr(row, api) for row in SAMPLING_FIELDS if getattr(row, api) is not None}
    assert {field.name: field.number for field in message.DESCRIPTOR.fields} == expected
    for field in message.DESCRIPTOR.fields:
        row = _row(field.name)
        assert field.is_repeated == row.is_list
        # the public API tells unset from 0 everywhere; the worker's only where None is a value
        assert field.has_presence == (not row.is_list and (api == "generation" or row.is_optional)), field.name


def test_rendered_comments_state_the_defaults_the_code_uses():
    generation = render_message("generation")
    top_k_comment = generation.split("optional int32 top_k = 4;")[0].rsplit("top_p = 3;", 1)[1]
    assert f"Default {SamplingParams().top_k}." in top_k_comment
    assert f"Default {_row('max_tokens').request_default}." in generation
    assert "random" not in generation and "random" not in render_message("worker")  # unset seeds draw none


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_engine_refuses_values_outside_the_bounds_naming_the_field(name):
    invalid = EXAMPLES[name][1]
    if invalid is None:
        with pytest.raises(ValueError, match=f"^{name} must be"):
            SamplingParams(**{name: "not a value"})
        return
    with pytest.raises(ValueError, match=f"^{name} must be"):
        SamplingParams(**{name: invalid})


@pytest.mark.parametrize("name", PUBLIC_ENGINE_NAMES)
def test_public_request_value_reaches_the_engine(name):
    pb = generation_pb2.SamplingParams()
    _set_pb(pb, name, EXAMPLES[name][0])
    sampling, stop = parse_sampling(pb, VOCAB_SIZE)
    assert getattr(sampling, name) == EXAMPLES[name][0]
    assert stop == []


@pytest.mark.parametrize("name", [name for name in PUBLIC_ENGINE_NAMES if EXAMPLES[name][1] is not None])
def test_public_request_out_of_bounds_is_invalid_naming_the_field(name):
    pb = generation_pb2.SamplingParams()
    _set_pb(pb, name, EXAMPLES[name][1])
    with pytest.raises(InvalidRequest) as error:
        parse_sampling(pb, VOCAB_SIZE)
    assert error.value.field.startswith(f"sampling.{name}")


def test_public_stop_strings_go_to_the_frontend_not_the_engine():
    pb = generation_pb2.SamplingParams(stop=EXAMPLES["stop"][0])
    sampling, stop = parse_sampling(pb, VOCAB_SIZE)
    assert stop == EXAMPLES["stop"][0] and not hasattr(sampling, "stop")


def test_unset_public_fields_take_the_table_defaults():
    sampling, _ = parse_sampling(generation_pb2.SamplingParams(), VOCAB_SIZE)
    for row in ENGINE_FIELDS:
        assert getattr(sampling, row.name) == row.default_when_unset, row.name


@pytest.mark.parametrize("name", ENGINE_NAMES)
def test_worker_message_round_trip_keeps_every_value(name):
    params = SamplingParams(**{name: EXAMPLES[name][0]})
    assert sampling_from_pb(sampling_to_pb(params)) == params


def test_worker_message_round_trip_keeps_unset_optionals_unset():
    params = SamplingParams()
    pb = sampling_to_pb(params)
    assert not pb.HasField("seed") and not pb.HasField("logprobs")
    assert sampling_from_pb(pb) == params


@pytest.mark.parametrize("row", OPENAI_ROWS, ids=lambda row: row.name)
def test_openai_parameter_reaches_the_public_request(row):
    body = CompletionRequest(prompt="hi", **{row.openai: EXAMPLES[row.name][0]})
    sampling = completion_requests(body, "id")[0].request.sampling
    assert (list if row.is_list else lambda value: value)(getattr(sampling, row.name)) == EXAMPLES[row.name][0]
    assert public_param(f"sampling.{row.name}", body, 0) == row.openai


@pytest.mark.parametrize("row", OPENAI_ROWS, ids=lambda row: row.name)
def test_openai_schema_offers_every_row_with_an_openai_name(row):
    assert row.openai in CompletionRequest.model_fields
    assert row.openai in ChatCompletionRequest.model_fields


def test_internal_rows_are_not_offered_to_users():
    internal = [row for row in SAMPLING_FIELDS if row.is_internal]
    assert internal, "num_output_tokens_before is internal"
    for row in internal:
        assert row.generation is None and row.openai is None
        assert row.name not in SamplingParams.field_names()


@pytest.mark.parametrize("row", [row for row in ENGINE_FIELDS if row.changes_greedy], ids=lambda row: row.name)
def test_rows_that_change_greedy_leave_the_argmax_fast_path(row):
    assert SamplingParams(temperature=0).is_plain_greedy
    assert not SamplingParams(temperature=0, **{row.name: EXAMPLES[row.name][0]}).is_plain_greedy
