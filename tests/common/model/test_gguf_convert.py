"""GGUF -> HF folder: exact round trips through llama.cpp-style files (Q/K permutation, Q8_0,
llama3 rope_freqs, sharding), agreement with transformers' own GGUF loader, and the embedded
SmolLM2 answering through transformers (which only works if Q/K were un-permuted)."""

import json

import gguf
import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import load_file

from common.model.config import ModelConfig
from common.model.gguf_convert import GGUFConversionError, convert_gguf, unpermute_rows
from common.model.weights import iterate_hf_weights
from tests.helpers.tiny_gguf import llama_cpp_permute, write_tiny_gguf
from tests.helpers.tiny_models import make_tiny_hf_model

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192, "rope_theta": 500000.0}


@pytest.mark.parametrize("num_heads, head_dim", [(4, 64), (3, 128), (8, 32)])
def test_unpermute_inverts_llama_cpp_permute(num_heads, head_dim):
    generator = np.random.default_rng(0)
    weight = generator.standard_normal((num_heads * head_dim, 48)).astype(np.float32)
    bias = generator.standard_normal(num_heads * head_dim).astype(np.float32)
    permuted = llama_cpp_permute(weight, num_heads)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rows(permuted, num_heads), weight)
    np.testing.assert_array_equal(unpermute_rows(llama_cpp_permute(bias, num_heads), num_heads), bias)


def test_llama_gguf_round_trip_is_exact(tmp_path):
    original = make_tiny_hf_model(tmp_path, num_heads=6, num_kv_heads=2, head_dim=64,
                                  rope_parameters=LLAMA3_ROPE, max_position_embeddings=16384)
    gguf_path = write_tiny_gguf(original, tmp_path / "tiny.gguf")
    convert_gguf(gguf_path, tmp_path / "converted", show_progress=False)
    expected = load_file(original / "model.safetensors")
    converted = load_file(tmp_path / "converted/model.safetensors")
    assert sorted(converted) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(converted[name], tensor), name
    assert ModelConfig.from_folder(tmp_path / "converted") == ModelConfig.from_folder(original)
    assert not (tmp_path / "converted/tokenizer.json").exists()  # this GGUF carries no tokenizer


def test_quantized_qwen2_gguf_is_close_and_not_permuted(tmp_path):
    original = make_tiny_hf_model(tmp_path, architecture="qwen2", num_heads=4, num_kv_heads=1,
                                  head_dim=64, tie_word_embeddings=True)
    gguf_path = write_tiny_gguf(original, tmp_path / "tiny-q8.gguf", quantize=True)
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(gguf_path).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    convert_gguf(gguf_path, tmp_path / "converted", show_progress=False, shard_bytes=200_000)
    assert (tmp_path / "converted/model.safetensors.index.json").is_file()
    expected = load_file(original / "model.safetensors")
    converted = dict(iterate_hf_weights(tmp_path / "converted"))
    assert sorted(converted) == sorted(k for k in expected if k != "lm_head.weight")
    for name, tensor in converted.items():
        # Q8_0: 8-bit values with one scale per 32: error below 1% of each row block's max.
        torch.testing.assert_close(tensor, expected[name], atol=0.01 * expected[name].abs().max().item(), rtol=0)
    config = ModelConfig.from_folder(tmp_path / "converted")
    assert config.architecture == "qwen2" and config.tie_word_embeddings and config.attention_bias


def test_tiny_conversion_matches_transformers_gguf_loader(tmp_path):
    original = make_tiny_hf_model(tmp_path, num_heads=8, num_kv_heads=2, head_dim=32)
    gguf_path = write_tiny_gguf(original, tmp_path / "tiny.gguf", quantize=True)
    convert_gguf(gguf_path, tmp_path / "converted", show_progress=False)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=gguf_path.name, dtype=torch.float32).state_dict()
    ours = load_file(tmp_path / "converted/model.safetensors")
    for name, tensor in ours.items():
        assert torch.equal(tensor, theirs[name]), name


def test_unsupported_gguf_architecture_is_named(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFConversionError, match="gpt2"):
        convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "out", show_progress=False)
    assert not (tmp_path / "out").exists()


def test_converted_smollm2_folder_is_complete(smollm2_folder):
    config = json.loads((smollm2_folder / "config.json").read_text())
    assert config["tie_word_embeddings"] and config["num_key_value_heads"] == 3
    model_config = ModelConfig.from_folder(smollm2_folder)
    assert model_config.eos_token_ids == (2,) and model_config.bos_token_id == 1
    for file_name in ("model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (smollm2_folder / file_name).is_file(), file_name


def test_converted_smollm2_answers_paris_in_transformers(smollm2_folder):
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32).eval()
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        output = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_conversion_matches_transformers_gguf_loader(smollm2_folder):
    """transformers reads the same GGUF (Q4_1/Q8_0 from llama.cpp) its own way; tensors agree."""
    from common.model.registry import embedded_gguf_path

    gguf_path = embedded_gguf_path()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).state_dict()
    ours = dict(iterate_hf_weights(smollm2_folder))
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.7.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight"):
        assert torch.equal(ours[name], theirs[name]), name
