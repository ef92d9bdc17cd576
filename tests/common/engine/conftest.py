"""Engine fixtures: one tiny random Llama, loaded once and shared by every engine built in a test."""

import pytest
import torch

from common.engine.config import EngineConfig
from common.engine.llm_engine import LLMEngine
from tests.helpers.tiny_models import make_tiny_hf_model


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("engine"), num_layers=2, vocab_size=512)


@pytest.fixture(scope="session")
def tiny_model(tiny_folder):
    from common.attention import get_attention_backend
    from common.model.weights import load_model

    backend = get_attention_backend("reference", torch.device("cpu"))
    return load_model(tiny_folder, "safetensors", "float32", "cpu", backend)


@pytest.fixture
def make_engine(tiny_model, tiny_folder):
    """make_engine(**EngineConfig fields) -> LLMEngine on the shared tiny model."""

    def build(**overrides) -> LLMEngine:
        settings = dict(model=str(tiny_folder), device="cpu", num_kv_blocks=128, max_model_len=256,
                        block_size=4, max_num_seqs=32, max_num_batched_tokens=256)
        settings.update(overrides)
        model, model_config = tiny_model
        return LLMEngine(EngineConfig(**settings), model=model, model_config=model_config)

    return build


@pytest.fixture(scope="session")
def hf_tiny(tiny_folder):
    """The same checkpoint in transformers, the reference for greedy tokens and logits."""
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(tiny_folder, dtype=torch.float32).eval()
