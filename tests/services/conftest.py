"""Service-test fixtures: one tiny random Llama with SmolLM2's tokenizer, loaded once per session."""

import pytest
import torch

from tests.helpers.tiny_models import make_tiny_hf_model
from tests.services.inprocess import InProcessSystem


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp("services"), num_layers=2, with_tokenizer=True)


@pytest.fixture(scope="session")
def tiny_model(tiny_folder):
    from common.attention import get_attention_backend
    from common.model.weights import load_model

    return load_model(tiny_folder, "safetensors", "float32", "cpu", get_attention_backend("reference", torch.device("cpu")))


@pytest.fixture(scope="session")
def tokenizer(tiny_folder):
    from common.tokenizer import load_tokenizer

    return load_tokenizer(tiny_folder)


@pytest.fixture
def make_system(tiny_folder, tiny_model):
    """make_system(**InProcessSystem kwargs) -> a started system, stopped after the test."""
    systems = []

    def build(**kwargs) -> InProcessSystem:
        model, model_config = tiny_model
        system = InProcessSystem(tiny_folder, model, model_config, **kwargs).start()
        systems.append(system)
        return system

    yield build
    for system in systems:
        system.stop()


@pytest.fixture(scope="module")
def system(tiny_folder, tiny_model):
    model, model_config = tiny_model
    system = InProcessSystem(tiny_folder, model, model_config).start()
    yield system
    system.stop()
