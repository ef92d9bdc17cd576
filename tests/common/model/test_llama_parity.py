"""Tandem's model vs transformers' on the same weights: packed prefill, decode and mixed steps
over a paged KV pool with scattered blocks, for GQA ratios 1/3/4, head dims 64/128, Llama, Qwen2
(q/k/v bias), Mistral, tied embeddings and llama3 RoPE scaling, then the embedded SmolLM2.

Each check runs on the CPU (reference attention) and on CUDA with both the Triton kernels (the
'auto' backend there) and the reference attention; tolerances are in tests/common/model/parity.py.
"""

import pytest
import torch

from tests.common.model.paged_runner import PagedRunner
from tests.common.model.parity import (
    BACKENDS, ModelCache, assert_bf16_logits_close, assert_close_logits, load_ours, load_theirs, paired_logits,
)
from tests.helpers.devices import on_cuda
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
# bf16 on the CPU checks one case (the CPU sibling); CUDA checks every case with both backends.
BF16_TINY_CASES = [pytest.param("qwen2-gqa3-d64", "cpu", "reference", id="qwen2-gqa3-d64-cpu-reference")] + [
    on_cuda(case, "cuda", backend_name, id=f"{case}-cuda-{'triton' if backend_name == 'auto' else backend_name}")
    for case in sorted(TINY_CASES) for backend_name in ("auto", "reference")
]
SMOLLM2_CHAT = [  # (user message, the start of an answer fed back one token per decode step)
    ("What is the capital of France?", "The capital of France is Paris, a city"),
    ("Write a haiku about the sea.", "Waves fold on the shore, salt and foam"),
    ("List three prime numbers.", "Two, three and five are prime numbers"),
]


def tiny_steps(vocab_size: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """Ragged prompts, three decode steps crossing blocks (size 4), then a mixed chunked step."""
    generator = torch.Generator().manual_seed(1)

    def tokens(n):
        return torch.randint(0, vocab_size, (n,), generator=generator).tolist()

    prompts = [tokens(5), tokens(11), tokens(1), tokens(8)]
    decode_steps = [[tokens(1) for _ in prompts] for _ in range(3)]
    mixed_step = [tokens(1), tokens(6), tokens(1), tokens(3)]  # chunked-prefill style: several new tokens
    return prompts, decode_steps + [mixed_step]


@pytest.mark.parametrize("device, backend_name", BACKENDS)
@pytest.mark.parametrize("case", sorted(TINY_CASES))
def test_tiny_models_match_transformers(tmp_path, case, device, backend_name):
    folder = make_tiny_hf_model(tmp_path, **TINY_CASES[case])
    model, config = load_ours(folder, torch.float32, device, backend_name)
    hf_model = load_theirs(folder, torch.float32, device)
    prompts, follow_ups = tiny_steps(config.vocab_size)
    for ours, theirs in paired_logits(PagedRunner(model, config), [hf_model], prompts, follow_ups):
        assert_close_logits(ours, theirs)


@pytest.mark.parametrize("case, device, backend_name", BF16_TINY_CASES)
def test_tiny_models_match_transformers_in_bfloat16(tmp_path, case, device, backend_name):
    folder = make_tiny_hf_model(tmp_path, **TINY_CASES[case])
    model, config = load_ours(folder, torch.bfloat16, device, backend_name)
    assert next(model.parameters()).dtype == torch.bfloat16
    hf_models = [load_theirs(folder, torch.bfloat16, device), load_theirs(folder, torch.float32, device)]
    prompts, follow_ups = tiny_steps(config.vocab_size)
    pairs = list(paired_logits(PagedRunner(model, config), hf_models, prompts, follow_ups))
    assert all(ours.dtype == torch.float32 for ours, _, _ in pairs)  # logits are float32 in any dtype
    assert_bf16_logits_close(*(torch.cat(column) for column in zip(*pairs)))


@pytest.fixture(scope="module")
def smollm2_models(smollm2_folder):
    return ModelCache(smollm2_folder)


@pytest.mark.parametrize("device, backend_name", BACKENDS)
def test_smollm2_matches_transformers(smollm2_models, device, backend_name):
    model, config = smollm2_models.ours(torch.float32, device, backend_name)
    hf_model = smollm2_models.theirs(torch.float32, device)
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, config.vocab_size, (n,), generator=generator).tolist() for n in (13, 6, 9)]
    follow_ups = [[[int(t)] for t in torch.randint(0, config.vocab_size, (3,), generator=generator)]
                  for _ in range(2)]
    for ours, theirs in paired_logits(PagedRunner(model, config), [hf_model], prompts, follow_ups):
        assert_close_logits(ours, theirs)


@pytest.mark.parametrize("device, backend_name", BACKENDS)
def test_smollm2_greedy_generation_over_paged_kv(smollm2_models, smollm2_folder, device, backend_name):
    """End to end on the real model: our paged decode loop answers like transformers' generate."""
    from common.tokenizer import apply_chat_template, load_tokenizer

    model, config = smollm2_models.ours(torch.float32, device, backend_name)
    hf_model = smollm2_models.theirs(torch.float32, device)
    tokenizer = load_tokenizer(smollm2_folder)
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "What is the capital of France?"}])
    runner = PagedRunner(model, config, block_size=16, num_blocks=8)
    generated = [int(runner.step([prompt])[0][-1].argmax())]
    while len(generated) < 12 and generated[-1] not in config.eos_token_ids:
        generated.append(int(runner.step([[generated[-1]]])[0][-1].argmax()))
    with torch.no_grad():
        expected = hf_model.generate(
            torch.tensor([prompt], device=hf_model.device), max_new_tokens=len(generated), do_sample=False
        )
    assert generated == expected[0, len(prompt):].tolist()
    assert "Paris" in tokenizer.decode(generated)


@pytest.mark.parametrize("device, backend_name", [p for p in BACKENDS if p.values[0] == "cuda"])
def test_smollm2_matches_transformers_in_bfloat16(smollm2_models, smollm2_folder, device, backend_name):
    """CUDA only (bf16 SmolLM2 is slow on the CPU; its CPU sibling is the tiny bf16 test): chat
    prompts packed in one prefill, then their answers fed back one token per decode step."""
    from common.tokenizer import apply_chat_template, load_tokenizer

    model, config = smollm2_models.ours(torch.bfloat16, device, backend_name)
    hf_models = [smollm2_models.theirs(torch.bfloat16, device), smollm2_models.theirs(torch.float32, device)]
    tokenizer = load_tokenizer(smollm2_folder)
    prompts = [apply_chat_template(tokenizer, [{"role": "user", "content": question}]) for question, _ in SMOLLM2_CHAT]
    answers = [tokenizer.encode(answer, add_special_tokens=False) for _, answer in SMOLLM2_CHAT]
    num_steps = min(len(answer) for answer in answers)
    follow_ups = [[[answer[step]] for answer in answers] for step in range(num_steps)]
    runner = PagedRunner(model, config, block_size=16, num_blocks=24)
    pairs = list(paired_logits(runner, hf_models, prompts, follow_ups))
    assert_bf16_logits_close(*(torch.cat(column) for column in zip(*pairs)))
