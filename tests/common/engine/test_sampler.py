"""Sampler: exact masks on constructed distributions, penalties on constructed logits, seeding."""

import math

import pytest
import torch

from common.engine.sampler import (
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    mix_seed,
)
from common.engine.sampling_params import SamplingParams


def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def row(params=None, output_index=0, prompt=(), output=()):
    return SamplingRow(params or SamplingParams(), output_index, list(prompt), list(output))


def kept(logits):
    return [torch.isfinite(r).nonzero().flatten().tolist() for r in logits]


def test_top_k_keeps_exactly_k_most_likely():
    logits = logits_of([[0.1, 0.4, 0.2, 0.3], [0.25, 0.05, 0.3, 0.4]])
    assert kept(apply_top_k(logits, torch.tensor([2, 0]))) == [[1, 3], [0, 1, 2, 3]]
    assert kept(apply_top_k(logits, torch.tensor([1, 3]))) == [[1], [0, 2, 3]]


def test_top_p_keeps_smallest_set_reaching_p():
    logits = logits_of([[0.5, 0.3, 0.15, 0.05]] * 3)
    # p=0.7: 0.5 alone is short, 0.5+0.3 reaches it; p=0.85: needs 0.15 too; p=0.4: top token only.
    assert kept(apply_top_p(logits, torch.tensor([0.7, 0.85, 0.4]))) == [[0, 1], [0, 1, 2], [0]]


def test_min_p_drops_below_fraction_of_top_prob():
    logits = logits_of([[0.5, 0.3, 0.15, 0.05], [0.5, 0.3, 0.15, 0.05]])
    # thresholds 0.5 * 0.35 = 0.175 and 0.5 * 0.25 = 0.125
    assert kept(apply_min_p(logits, torch.tensor([0.35, 0.25]))) == [[0, 1], [0, 1, 2]]


def test_penalties_on_constructed_logits():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits, [row(params, prompt=[0, 1], output=[3, 3, 1])])
    # token 0: prompt, positive -> /2; token 1: prompt+output once, negative -> *2, -0.5*1, -0.25
    # token 3: output twice, positive -> /2, -0.5*2, -0.25; tokens 2, 4 untouched
    expected = torch.tensor([[1.0, -2.0 - 0.5 - 0.25, 0.5, 1.5 - 1.0 - 0.25, -2.0]])
    assert torch.allclose(out, expected)


def test_penalties_change_greedy_choice():
    logits = torch.tensor([[3.0, 2.9, 0.0]])
    sampler = Sampler(torch.Generator().manual_seed(0))
    greedy = SamplingParams(temperature=0)
    penalized = SamplingParams(temperature=0, presence_penalty=0.5)
    tokens, _ = sampler(logits.repeat(2, 1), [row(greedy, output=[0]), row(penalized, output=[0])])
    assert tokens == [0, 1]


def test_sampled_tokens_follow_the_distribution():
    probs = [0.6, 0.3, 0.1, 0.0]
    sampler = Sampler(torch.Generator().manual_seed(1))
    logits = logits_of([probs] * 4000)
    tokens, _ = sampler(logits, [row()] * 4000)
    counts = torch.bincount(torch.tensor(tokens), minlength=4).float() / 4000
    assert counts[3] == 0
    assert torch.allclose(counts, torch.tensor(probs), atol=0.03)


def test_seeded_draws_depend_only_on_seed_and_index():
    torch.manual_seed(0)
    target = torch.randn(1, 50)
    seeded = SamplingParams(temperature=1.0, seed=1234)
    alone, _ = Sampler(torch.Generator().manual_seed(0))(target, [row(seeded, output_index=3)])
    others = [row(SamplingParams(temperature=0.8, top_k=5)) for _ in range(7)]
    batch = torch.cat([torch.randn(7, 50), target])
    mixed, _ = Sampler(torch.Generator().manual_seed(99))(batch, others + [row(seeded, output_index=3)])
    assert mixed[-1] == alone[0]
    draws = {Sampler(torch.Generator())(target, [row(seeded, output_index=i)])[0][0] for i in range(30)}
    assert len(draws) > 1  # a fresh draw per output index, not one fixed token
    assert mix_seed(1234, 3) != mix_seed(1234, 4) != mix_seed(1235, 3)


def test_logprobs_are_raw_model_logprobs_with_top_n():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    params = SamplingParams(temperature=0, logprobs=2, repetition_penalty=1.5)
    tokens, logprobs = Sampler(torch.Generator())(logits, [row(params, prompt=[1])])
    raw = torch.log_softmax(logits, dim=-1)[0]
    lp = logprobs[0]
    assert lp.token_id == tokens[0]
    assert lp.logprob == pytest.approx(raw[tokens[0]].item())
    assert lp.top_token_ids == [1, 2]
    assert lp.top_logprobs == pytest.approx([raw[1].item(), raw[2].item()])
    assert math.isclose(sum(math.exp(v) for v in raw.tolist()), 1.0, rel_tol=1e-6)


@pytest.mark.parametrize(
    "field, value",
    [("temperature", -0.1), ("top_p", 0.0), ("top_k", -2), ("min_p", 1.5), ("repetition_penalty", 0),
     ("frequency_penalty", 2.5), ("presence_penalty", -3), ("max_tokens", 0), ("logprobs", 21),
     ("seed", "x"), ("stop_token_ids", [-1])],
)
def test_bad_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=4, min_tokens=5)
