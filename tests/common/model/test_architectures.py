"""The model family registry: HF `architectures` -> family, clear errors for unknown names, and adding
a family as one module (the Phi-3 example of docs/architecture.md, checked against transformers)."""

import dataclasses
import json
import shutil
import uuid
from pathlib import Path

import pytest
import torch

from common.attention import get_attention_backend
from common.model import architectures
from common.model.architectures import (
    check_distinct, family_for_architecture, family_for_gguf, family_for_hf_config, hf_architecture_name,
    known_architectures,
)
from common.model.config import ModelConfig
from common.model.families.llama import FAMILY as LLAMA_FAMILY
from common.model.weights import build_empty_model
from tests.common.model.paged_runner import PagedRunner
from tests.common.model.parity import assert_close_logits, load_ours, load_theirs, paired_logits
from tests.common.model.test_model_config import LLAMA31_V4

PHI3_EXAMPLE = Path(__file__).with_name("phi3_family_example.py")
LLAMA_VARIANTS = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}


def test_the_llama_family_serves_llama_mistral_and_qwen2():
    assert known_architectures() == sorted(LLAMA_VARIANTS)
    for architecture, model_type in LLAMA_VARIANTS.items():
        assert family_for_architecture(architecture) is LLAMA_FAMILY
        config = ModelConfig.from_hf_config(dict(LLAMA31_V4, architectures=[architecture], model_type=model_type))
        assert config.architecture == model_type
        assert hf_architecture_name(model_type) == architecture
    assert family_for_gguf("qwen2") is LLAMA_FAMILY


def test_the_architecture_decides_and_model_type_is_only_a_fallback():
    without_model_type = {k: v for k, v in LLAMA31_V4.items() if k != "model_type"}
    config = ModelConfig.from_hf_config(dict(without_model_type, architectures=["Qwen2ForCausalLM"]))
    assert config.architecture == "qwen2" and config.attention_bias
    assert family_for_hf_config(LLAMA31_V4) == (LLAMA_FAMILY, "llama")  # no `architectures`: by model_type


def test_an_unknown_architecture_names_itself_and_the_known_ones():
    hf = dict(LLAMA31_V4, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ValueError, match="'GPT2LMHeadModel'.*LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        ModelConfig.from_hf_config(hf)
    with pytest.raises(ValueError, match="GGUF architecture 'gpt2'.*llama, qwen2"):
        family_for_gguf("gpt2")


def test_an_architecture_with_another_model_type_is_rejected():
    with pytest.raises(ValueError, match="'Qwen2ForCausalLM' with model_type 'llama'.*'qwen2'"):
        ModelConfig.from_hf_config(dict(LLAMA31_V4, architectures=["Qwen2ForCausalLM"]))


def test_a_config_of_no_family_fails_when_the_model_is_built():
    config = ModelConfig.llama_shape("tiny").with_overrides(architecture="gpt2")
    with pytest.raises(ValueError, match="model_type 'gpt2'.*known architectures: LlamaForCausalLM"):
        build_empty_model(config, get_attention_backend("reference", torch.device("cpu")), torch.float32, "cpu")


def test_two_families_may_not_claim_one_name():
    with pytest.raises(ValueError, match="'llama' and 'copy' both claim 'LlamaForCausalLM'"):
        check_distinct([LLAMA_FAMILY, dataclasses.replace(LLAMA_FAMILY, name="copy")])


@pytest.fixture
def families_package(tmp_path, monkeypatch):
    """A families package of its own (the Llama family plus what a test drops in), found instead of
    common/model/families/."""
    package = tmp_path / f"families_{uuid.uuid4().hex}"  # a new name: imported packages stay in sys.modules
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "llama.py").write_text("from common.model.families.llama import FAMILY  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(architectures, "FAMILIES_PACKAGE", package.name)
    architectures.all_families.cache_clear()
    yield package
    architectures.all_families.cache_clear()


def test_a_family_module_without_a_family_is_refused(families_package):
    (families_package / "broken.py").write_text("ARCHITECTURES = {}\n")
    with pytest.raises(TypeError, match=r"\.broken must define FAMILY"):
        known_architectures()


def _tiny_phi3_checkpoint(folder: Path) -> Path:
    import transformers

    config = transformers.Phi3Config(
        vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        max_position_embeddings=2048, original_max_position_embeddings=2048,
    )
    torch.manual_seed(0)
    model = transformers.Phi3ForCausalLM(config)
    with torch.no_grad():  # far from the default init, so a dropped or swapped tensor changes the logits
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape)
            param.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else noise * 128**-0.5)
    model.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    return folder


def test_adding_a_family_is_one_module(families_package, tmp_path):
    """The docs' Phi-3 example, dropped in as a file, serves a Phi-3 checkpoint as transformers does."""
    folder = _tiny_phi3_checkpoint(tmp_path / "phi3")
    with pytest.raises(ValueError, match="'Phi3ForCausalLM'"):
        ModelConfig.from_folder(folder)
    shutil.copy(PHI3_EXAMPLE, families_package / "phi3.py")
    architectures.all_families.cache_clear()
    assert "Phi3ForCausalLM" in known_architectures()
    model, config = load_ours(folder, torch.float32, "cpu", "reference")
    assert config.architecture == "phi3"
    prompts = [[5, 9, 200, 31, 7], [11, 3, 480], [42]]
    follow_ups = [[[17], [250], [9]], [[1, 2, 3], [64], [300]]]
    pairs = paired_logits(PagedRunner(model, config), [load_theirs(folder, torch.float32, "cpu")], prompts, follow_ups)
    for ours, theirs in pairs:
        assert_close_logits(ours, theirs)
