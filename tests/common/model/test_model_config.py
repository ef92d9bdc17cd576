"""ModelConfig parsing: transformers 4.x and 5.x config layouts, defaults, presets, clear rejections."""

import json

import pytest
import torch

from common.model.config import ModelConfig, RopeScaling
from common.model.layers import rope_inverse_frequencies

LLAMA31_V4 = {  # Llama 3.1 8B config.json as written by transformers 4.x
    "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "max_position_embeddings": 131072, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "tie_word_embeddings": False,
}


def test_llama31_v4_layout_matches_preset():
    config = ModelConfig.from_hf_config(LLAMA31_V4)
    assert config == ModelConfig.llama_shape("llama-3-8b")
    assert config.head_dim == 128 and config.num_queries_per_kv == 4
    assert config.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


def test_transformers5_rope_parameters_and_dtype_key():
    hf = {k: v for k, v in LLAMA31_V4.items() if k not in ("rope_theta", "rope_scaling", "torch_dtype")}
    hf["rope_parameters"] = dict(LLAMA31_V4["rope_scaling"], rope_theta=500000.0)
    hf["dtype"] = "bfloat16"
    assert ModelConfig.from_hf_config(hf) == ModelConfig.from_hf_config(LLAMA31_V4)


def test_qwen2_has_qkv_bias_only_and_defaults():
    config = ModelConfig.from_hf_config({
        "model_type": "qwen2", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "eos_token_id": 7,
    })
    assert (config.attention_bias, config.attention_output_bias) == (True, False)
    assert config.num_key_value_heads == 4 and config.head_dim == 16
    assert config.rope_scaling is None and config.eos_token_ids == (7,)


def test_llama_attention_bias_covers_output_projection():
    hf = dict(LLAMA31_V4, attention_bias=True)
    config = ModelConfig.from_hf_config(hf)
    assert config.attention_bias and config.attention_output_bias


def test_mistral_sliding_window_caps_context():
    hf = dict(LLAMA31_V4, model_type="mistral", sliding_window=4096, rope_scaling=None)
    assert ModelConfig.from_hf_config(hf).max_position_embeddings == 4096


def test_from_folder_merges_generation_config_eos(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(LLAMA31_V4, eos_token_id=128001)))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [128001, 128009],
                                                                 "bos_token_id": 128000}))
    config = ModelConfig.from_folder(tmp_path)
    assert config.eos_token_ids == (128001, 128009) and config.bos_token_id == 128000


def test_from_folder_without_config_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_folder(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "llama3"),
        ({"num_key_value_heads": 5}, "num_key_value_heads"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"torch_dtype": "int8"}, "dtype"),
        ({"vocab_size": 0}, "vocab_size"),
        ({"head_dim": 127}, "head_dim"),
    ],
)
def test_rejects_unsupported_configs_naming_the_field(change, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_hf_config(dict(LLAMA31_V4, **change))


def test_missing_required_field_is_named():
    hf = dict(LLAMA31_V4)
    del hf["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_hf_config(hf)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="llama-3-8b"):
        ModelConfig.llama_shape("llama-9")


def test_llama3_rope_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = LlamaConfig(
        hidden_size=4096, num_attention_heads=32, max_position_embeddings=131072,
        rope_parameters=dict(LLAMA31_V4["rope_scaling"], rope_theta=500000.0),
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    config = ModelConfig.from_hf_config(LLAMA31_V4)
    ours = rope_inverse_frequencies(config.head_dim, config.rope_theta, config.rope_scaling)
    torch.testing.assert_close(ours, expected.float(), rtol=1e-6, atol=0)
    assert not torch.allclose(ours, rope_inverse_frequencies(128, 500000.0, None))
