"""Tandem's model vs transformers' on the same weights: packed prefill, decode and mixed steps
over a paged KV pool with scattered blocks, for GQA ratios 1/3/4, head dims 64/128, Llama, Qwen2
(q/k/v bias), Mistral, tied embeddings and llama3 RoPE scaling, then the embedded SmolLM2.
"""

import pytest
import torch
import transformers

from common.attention import get_attention_backend
from common.model.weights import load_model
from tests.common.model.paged_runner import PagedRunner
from tests.helpers.tiny_models import make_tiny_hf_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}

TINY_CASES = {
    "llama-gqa1-d64": dict(architecture="llama", num_heads=4, num_kv_heads=4, head_dim=64),
    "qwen2-gqa3-d64": dict(architecture="qwen2", num_heads=6, num_kv_heads=2, head_dim=64),
    "mistral-gqa4-d128": dict(architecture="mistral", num_heads=4, num_kv_heads=1, head_dim=128),
    "llama-gqa4-d128-tied-llama3-bias": dict(
        architecture="llama", num_heads=8, num_kv_heads=2, head_dim=128, tie_word_embeddings=True,
        rope_parameters=LLAMA3_ROPE, attention_bias=True, num_layers=3,
    ),
    "qwen2-gqa3-d128-tied": dict(architecture="qwen2", num_heads=3, num_kv_heads=1, head_dim=128,
                                 tie_word_embeddings=True),
}


def reference_logits(hf_model, token_ids: list[int]) -> torch.Tensor:  # [len, vocab]
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


def assert_close_logits(ours: torch.Tensor, reference: torch.Tensor, relative: float = 1e-4) -> None:
    scale = reference.abs().max().item()
    error = (ours - reference).abs().max().item()
    assert error <= relative * scale + 1e-6, f"max abs diff {error:.3g} vs logit scale {scale:.3g}"


def check_against_reference(model, config, hf_model, prompts, follow_ups, relative=1e-4):
    """Prefill all prompts in one packed step, then one step per entry of follow_ups."""
    runner = PagedRunner(model, config)
    step_logits = runner.step(prompts)
    for seq_index, prompt in enumerate(prompts):
        assert_close_logits(step_logits[seq_index], reference_logits(hf_model, prompt), relative)
    for new_tokens in follow_ups:
        step_logits = runner.step(new_tokens)
        for seq_index, new in enumerate(new_tokens):
            full = reference_logits(hf_model, runner.token_ids[seq_index])
            assert_close_logits(step_logits[seq_index], full[-len(new):], relative)


@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_tiny_models_match_transformers(tmp_path, case):
    folder = make_tiny_hf_model(tmp_path, **TINY_CASES[case])
    backend = get_attention_backend("reference", torch.device("cpu"))
    model, config = load_model(folder, "auto", torch.float32, "cpu", backend)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(1)

    def tokens(n):
        return torch.randint(0, config.vocab_size, (n,), generator=generator).tolist()

    prompts = [tokens(5), tokens(11), tokens(1), tokens(8)]
    decode_steps = [[tokens(1) for _ in prompts] for _ in range(3)]  # crosses block boundaries (size 4)
    mixed_step = [tokens(1), tokens(6), tokens(1), tokens(3)]  # chunked-prefill style: several new tokens
    check_against_reference(model, config, hf_model, prompts, decode_steps + [mixed_step])


def test_bfloat16_model_tracks_float32(tmp_path):
    """bf16 runs the same code path; its logits stay near the fp32 ones (bf16 rounding, not a bug)."""
    folder = make_tiny_hf_model(tmp_path, architecture="qwen2", num_heads=4, num_kv_heads=2, head_dim=64)
    backend = get_attention_backend("reference", torch.device("cpu"))
    fp32_model, config = load_model(folder, "auto", "float32", "cpu", backend)
    bf16_model, _ = load_model(folder, "auto", "bfloat16", "cpu", backend)
    assert next(bf16_model.parameters()).dtype == torch.bfloat16
    prompts = [[3, 17, 99, 250, 7, 8], [400, 5]]
    fp32_logits = PagedRunner(fp32_model, config).step(prompts)
    bf16_logits = PagedRunner(bf16_model, config).step(prompts)
    for ours, reference in zip(bf16_logits, fp32_logits):
        assert ours.dtype == torch.float32
        assert_close_logits(ours, reference, relative=0.05)
        assert torch.equal(ours[-1].argmax(), reference[-1].argmax())


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_folder):
    model, config = load_model(smollm2_folder, "auto", "float32", "cpu", None)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    return model, config, hf_model


def test_smollm2_matches_transformers(smollm2_pair):
    model, config, hf_model = smollm2_pair
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in (13, 6, 9)]
    follow_ups = [[[int(t)] for t in torch.randint(0, config.vocab_size, (3,), generator=generator)]
                  for _ in range(2)]
    check_against_reference(model, config, hf_model, prompts, follow_ups)


def test_smollm2_greedy_generation_over_paged_kv(smollm2_pair, smollm2_folder):
    """End to end on the real model: our paged decode loop answers like transformers' generate."""
    from common.tokenizer import apply_chat_template, load_tokenizer

    model, config, hf_model = smollm2_pair
    tokenizer = load_tokenizer(smollm2_folder)
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    runner = PagedRunner(model, config, block_size=16, num_blocks=8)
    generated = [int(runner.step([prompt])[0][-1].argmax())]
    while len(generated) < 12 and generated[-1] not in config.eos_token_ids:
        generated.append(int(runner.step([[generated[-1]]])[0][-1].argmax()))
    with torch.no_grad():
        expected = hf_model.generate(torch.tensor([prompt]), max_new_tokens=len(generated), do_sample=False)
    assert generated == expected[0, len(prompt):].tolist()
    assert "Paris" in tokenizer.decode(generated)
