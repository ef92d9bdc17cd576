"""One place picks the model's operations: the fused Triton set with the Triton attention backend, the
PyTorch reference otherwise, and every module of a built model computes with that one set."""

import torch

from common.attention import get_attention_backend
from common.model.config import ModelConfig
from common.model.ops import FUSED_OPS, REFERENCE_OPS, model_ops
from common.model.weights import build_empty_model

CPU = torch.device("cpu")


def test_triton_attention_brings_the_fused_kernels_and_every_other_backend_the_reference():
    assert model_ops(get_attention_backend("triton", CPU)) is FUSED_OPS
    assert model_ops(get_attention_backend("reference", CPU)) is REFERENCE_OPS
    assert model_ops(get_attention_backend("auto", CPU)) is REFERENCE_OPS  # auto on CPU is the reference


def test_every_module_of_a_model_computes_with_the_models_one_set():
    config = ModelConfig.llama_shape("tiny")
    for backend_name, expected in (("triton", FUSED_OPS), ("reference", REFERENCE_OPS)):
        model = build_empty_model(config, get_attention_backend(backend_name, CPU), torch.float32, CPU)
        holders = [module for module in model.modules() if hasattr(module, "ops")]
        # Per layer: two norms, attention and the MLP; plus the final norm and the model itself.
        assert len(holders) == 4 * config.num_hidden_layers + 2
        assert all(module.ops is expected for module in holders), backend_name
