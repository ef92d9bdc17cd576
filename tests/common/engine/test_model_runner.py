"""ModelRunner: the greedy fast path picks what the general sampler picks; decode steps use the staged path."""

import torch

from common.engine.model_runner import ModelRunner, _sampling_row
from common.engine.sampling_params import SamplingParams
from common.engine.sequence import Sequence
from common.kv.kv_pool import KVPool
from common.kv.layout import KVLayout


def make_runner(tiny_model) -> ModelRunner:
    model, config = tiny_model
    layout = KVLayout(model_name="tiny", num_layers=config.num_hidden_layers, block_size=4,
                      num_kv_heads=config.num_key_value_heads, head_dim=config.head_dim, dtype="float32")
    return ModelRunner(model, KVPool(layout, 16, "cpu"), torch.device("cpu"), seed=0, max_num_seqs=8, max_model_len=64)


def test_greedy_fast_path_equals_the_general_sampler(tiny_model):
    runner = make_runner(tiny_model)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 512, generator=generator)
    logits[2, 7] = logits[2].max() + 1e-3  # a near tie decided the same way by both paths
    greedy = [Sequence(f"g{i}", [1, 2, 3], SamplingParams(temperature=0)) for i in range(6)]
    assert all(seq.sampling_params.is_plain_greedy for seq in greedy)
    fast = [sample.token_id for sample in runner._sample(logits, greedy)]
    general, _ = runner.sampler(logits, [_sampling_row(seq) for seq in greedy])
    assert fast == general == logits.argmax(dim=-1).tolist()
    assert fast[2] == 7
    # One row asking for logprobs sends the whole batch down the general path, with the same tokens.
    mixed = greedy[:5] + [Sequence("lp", [1, 2, 3], SamplingParams(temperature=0, logprobs=2))]
    samples = runner._sample(logits, mixed)
    assert [s.token_id for s in samples] == fast
    assert samples[5].logprobs is not None and all(s.logprobs is None for s in samples[:5])


def test_plain_greedy_excludes_penalties_logprobs_and_temperature():
    assert SamplingParams(temperature=0).is_plain_greedy
    assert not SamplingParams(temperature=0, repetition_penalty=1.2).is_plain_greedy
    assert not SamplingParams(temperature=0, logprobs=0).is_plain_greedy
    assert not SamplingParams(temperature=0.7).is_plain_greedy
