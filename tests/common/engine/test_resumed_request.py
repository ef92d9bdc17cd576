"""A request resumed elsewhere mid-stream (prompt + its earlier outputs, `num_output_tokens_before`)
gets the tokens it would have got undisturbed: seeds, penalties, min_tokens and max_tokens go on."""

import dataclasses

import pytest

from common.engine.sampling_params import SamplingParams
from tests.common.engine.engine_helpers import run_to_completion
from tests.common.engine.test_engine_handoff import requests

NUM_BEFORE = 5  # tokens generated before the request moved


def test_resumed_requests_continue_where_they_were(make_engine):
    single = make_engine()
    for request_id, prompt, params in requests():
        single.add_request(request_id, prompt, params)
    expected, _ = run_to_completion(single)

    resumed = make_engine(seed=3)  # another engine: unseeded draws differ, seeded ones must not
    for request_id, prompt, params in requests():
        before = expected[request_id][:NUM_BEFORE]
        resumed.add_request(request_id, prompt + before,
                            dataclasses.replace(params, num_output_tokens_before=NUM_BEFORE))
    outputs, _ = run_to_completion(resumed)
    for request_id, _, params in requests():
        if params.is_greedy or params.seed is not None:
            assert expected[request_id][:NUM_BEFORE] + outputs[request_id] == expected[request_id], request_id
        assert len(outputs[request_id]) == params.max_tokens - NUM_BEFORE


def test_resumed_prefill_samples_output_index_of_the_earlier_outputs(make_engine):
    params = SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True, presence_penalty=1.5)
    single = make_engine()
    single.add_request("a", [9, 10, 11], params)
    expected, _ = run_to_completion(single)
    prefill = make_engine(seed=4)
    prefill.add_prefill_request("a", [9, 10, 11, *expected["a"][:3]],
                                dataclasses.replace(params, num_output_tokens_before=3))
    (output,) = prefill.step()
    assert output.new_token_ids == [expected["a"][3]] and output.num_output_tokens == 4
    assert output.num_prompt_tokens == 6  # the KV covers every token sent


@pytest.mark.parametrize("num_before, prompt_length", [(-1, 4), (8, 9), (4, 4)])
def test_earlier_outputs_must_fit_the_prompt_and_max_tokens(make_engine, num_before, prompt_length):
    engine = make_engine()
    with pytest.raises(ValueError, match="num_output_tokens_before"):
        params = SamplingParams(max_tokens=8, num_output_tokens_before=num_before)
        engine.add_request("a", list(range(3, 3 + prompt_length)), params)


def test_num_output_tokens_before_is_not_a_user_field():
    assert "num_output_tokens_before" not in SamplingParams.field_names()
