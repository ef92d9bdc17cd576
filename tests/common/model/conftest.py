"""Shared fixtures: the embedded SmolLM2 folder is converted once and cached on disk across runs;
float32 matmuls on CUDA run at full precision (TF32 off) in every test here."""

import pytest

from tests.helpers.devices import exact_float32_matmuls
from tests.helpers.tiny_models import embedded_model_folder


@pytest.fixture(scope="session")
def smollm2_folder():
    return embedded_model_folder()


@pytest.fixture(autouse=True)
def float32_without_tf32():
    with exact_float32_matmuls():
        yield
