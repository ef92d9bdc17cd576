"""Weight loading: sharded safetensors, clear errors for missing/unexpected/mis-shaped tensors,
deterministic dummy weights, dtype resolution. Loading onto a device and dummy weights drawn there
are checked on the CPU and on CUDA (with the 'auto' attention backend: Triton there)."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.attention import get_attention_backend
from common.model.config import ModelConfig
from common.model.weights import WeightLoadError, iterate_hf_weights, load_model, resolve_dtype
from tests.common.model.paged_runner import PagedRunner
from tests.helpers.devices import DEVICES
from tests.helpers.tiny_models import make_tiny_hf_model

CPU = torch.device("cpu")
BACKEND = get_attention_backend("reference", CPU)
PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300]]


def auto_backend(device: str):
    return get_attention_backend("auto", torch.device(device))


@pytest.mark.parametrize("device", DEVICES)
def test_sharded_checkpoint_loads_like_single_file(tmp_path, device):
    single = make_tiny_hf_model(tmp_path, name="single")
    sharded = make_tiny_hf_model(tmp_path, name="sharded", max_shard_size="100KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    single_model, config = load_model(single, "auto", "float32", device, auto_backend(device))
    sharded_model, _ = load_model(sharded, "safetensors", "float32", device, auto_backend(device))
    expected = load_file(single / "model.safetensors")
    assert torch.equal(single_model.model.norm.weight.cpu(), expected["model.norm.weight"])
    for (name, a), (_, b) in zip(single_model.named_parameters(), sharded_model.named_parameters()):
        assert a.device.type == device and torch.equal(a, b), name
    assert len(dict(iterate_hf_weights(sharded))) == len(load_file(single / "model.safetensors"))


def _rewrite_checkpoint(folder, edit):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_weight_is_named(tmp_path):
    folder = make_tiny_hf_model(tmp_path)
    _rewrite_checkpoint(folder, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(WeightLoadError, match=r"missing 1 tensors.*layers\.1\.self_attn\.k_proj\.weight"):
        load_model(folder, "auto", "float32", "cpu", BACKEND)


def test_unexpected_weight_is_named(tmp_path):
    folder = make_tiny_hf_model(tmp_path)
    _rewrite_checkpoint(folder, lambda t: t.update({"model.layers.9.mlp.up_proj.weight": torch.zeros(2, 2)}))
    with pytest.raises(WeightLoadError, match=r"unexpected.*layers\.9\.mlp\.up_proj"):
        load_model(folder, "auto", "float32", "cpu", BACKEND)


def test_mis_shaped_weight_is_named(tmp_path):
    folder = make_tiny_hf_model(tmp_path)
    _rewrite_checkpoint(folder, lambda t: t.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(WeightLoadError, match=r"model\.norm\.weight.*\(7,\)"):
        load_model(folder, "auto", "float32", "cpu", BACKEND)


def test_folder_without_weights_is_reported(tmp_path):
    folder = make_tiny_hf_model(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_model(folder, "auto", "float32", "cpu", BACKEND)


def test_tied_checkpoint_ignores_saved_lm_head(tmp_path):
    folder = make_tiny_hf_model(tmp_path, tie_word_embeddings=True)
    _rewrite_checkpoint(folder, lambda t: t.update({"lm_head.weight": torch.zeros(512, 128)}))
    model, _ = load_model(folder, "auto", "float32", "cpu", BACKEND)
    assert model.lm_head is None
    assert model.compute_logits(torch.ones(1, 128)).abs().max() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_dummy_weights_are_deterministic_and_seeded(device):
    config = ModelConfig.llama_shape("tiny")
    backend = auto_backend(device)
    first, _ = load_model(None, "dummy", "float32", device, backend, model_config=config, seed=3)
    again, _ = load_model(None, "dummy", "float32", device, backend, model_config=config, seed=3)
    other, _ = load_model(None, "dummy", "float32", device, backend, model_config=config, seed=4)
    logits = PagedRunner(first, config).step(PROMPTS)
    assert all(torch.equal(a, b) for a, b in zip(logits, PagedRunner(again, config).step(PROMPTS)))
    assert not torch.equal(logits[0], PagedRunner(other, config).step(PROMPTS)[0])
    norm = first.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    weight = first.model.layers[0].self_attn.qkv_proj.weight
    assert 0.015 < weight.std().item() < 0.025


@pytest.mark.parametrize("device", DEVICES)
def test_dummy_weights_follow_a_config_folder_in_half_precision(tmp_path, device):
    folder = make_tiny_hf_model(tmp_path, architecture="qwen2", num_heads=4, num_kv_heads=1, head_dim=64)
    model, config = load_model(folder, "dummy", "float16", device, auto_backend(device))
    assert config.architecture == "qwen2" and model.model.layers[0].self_attn.qkv_proj.bias is not None
    assert next(model.parameters()).dtype == torch.float16
    logits = PagedRunner(model, config).step(PROMPTS)
    assert logits[0].dtype == torch.float32 and torch.isfinite(logits[0]).all()


def test_dtype_resolution():
    tiny = ModelConfig.llama_shape("tiny").with_overrides(torch_dtype="float16")
    assert resolve_dtype("auto", tiny, CPU) == torch.float32
    assert resolve_dtype("auto", tiny, torch.device("cuda")) == torch.float16
    fp32 = tiny.with_overrides(torch_dtype="float32")
    assert resolve_dtype("auto", fp32, torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype("bf16", tiny, CPU) == torch.bfloat16
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int4", tiny, CPU)


def test_bad_load_arguments_are_reported(tmp_path):
    with pytest.raises(ValueError, match="load_format"):
        load_model(tmp_path, "pickle", "float32", "cpu", BACKEND)
    with pytest.raises(ValueError, match="model_config"):
        load_model(None, "dummy", "float32", "cpu", BACKEND)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope", "safetensors", "float32", "cpu", BACKEND)
    with pytest.raises(ValueError, match="kv_cache shape"):
        model, config = load_model(None, "dummy", "float32", "cpu", BACKEND,
                                   model_config=ModelConfig.llama_shape("tiny"))
        runner = PagedRunner(model, config.with_overrides(num_hidden_layers=1))
        runner.step(PROMPTS)


def test_tiny_model_with_embedded_tokenizer_serves_chat_prompts(tmp_path):
    from common.tokenizer import apply_chat_template, load_tokenizer

    folder = make_tiny_hf_model(tmp_path, with_tokenizer=True, tie_word_embeddings=True)
    tokenizer = load_tokenizer(folder)
    model, config = load_model(folder, "auto", "float32", "cpu", BACKEND)
    assert config.vocab_size == len(tokenizer) and config.eos_token_ids == (2,)
    prompt = apply_chat_template(tokenizer, [{"role": "user", "content": "Hi"}])
    logits = PagedRunner(model, config, num_blocks=16).step([prompt])[0]
    assert logits.shape == (len(prompt), config.vocab_size) and torch.isfinite(logits).all()
