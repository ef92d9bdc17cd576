"""Shared fixtures: the embedded SmolLM2 folder is converted once and cached on disk across runs."""

import pytest

from tests.helpers.tiny_models import embedded_model_folder


@pytest.fixture(scope="session")
def smollm2_folder():
    return embedded_model_folder()
