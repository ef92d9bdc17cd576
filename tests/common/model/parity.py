"""Tandem's model vs transformers' on the same weights: loading both, stepping them, comparing logits.

float32: every row within 1e-4 of the logit scale (max |logit|) of transformers run with eager
attention, i.e. plain float32 matmuls (TF32 is off in this folder's tests, tests/common/model/conftest.py).

bfloat16: ‖ours − theirs‖ / ‖theirs‖ over all logits of a run below 2e-2, against transformers in
bfloat16, and ours no further than that from transformers in float32. Two bf16 implementations
that round at different points drift apart by up to their own distance from float32, so where
transformers' bf16 logits are further than 2e-2 / 1.5 from its fp32 ones (SmolLM2 on chat
prompts: 3.5e-2, with ours 2.8e-2 from its bf16 on CPU), the bound is 1.5 times that distance
instead: rounding stays within it, a bug does not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest
import torch
import transformers

from common.attention import get_attention_backend
from common.model.weights import load_model
from tests.common.model.paged_runner import PagedRunner
from tests.helpers.devices import on_cuda

# (device, attention backend): 'auto' means Triton on CUDA; CUDA also runs the PyTorch reference.
BACKENDS = [
    pytest.param("cpu", "reference", id="cpu-reference"),
    on_cuda("cuda", "auto", id="cuda-triton"),
    on_cuda("cuda", "reference", id="cuda-reference"),
]
FP32_RELATIVE = 1e-4  # of the logit scale, per row
BF16_RELATIVE = 2e-2  # norm of the difference over norm of transformers' logits
BF16_NOISE_FACTOR = 1.5


def load_ours(folder: Path, dtype: torch.dtype, device: str, backend_name: str):
    """(model, config) on `device`; 'auto' must resolve to Triton on CUDA."""
    backend = get_attention_backend(backend_name, torch.device(device))
    if backend_name == "auto":
        assert backend.name == ("triton" if device == "cuda" else "reference")
    return load_model(folder, "auto", dtype, device, backend)


def load_theirs(folder: Path, dtype: torch.dtype, device: str):
    """transformers' model; float32 runs eager attention (exact float32 matmuls, no fused kernel)."""
    options = {"attn_implementation": "eager"} if dtype == torch.float32 else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **options)
    return model.to(device).eval()


class ModelCache:
    """Loads each model once per (implementation, dtype, device, backend) for a module's tests."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.models: dict[tuple, object] = {}

    def ours(self, dtype: torch.dtype, device: str, backend_name: str):
        key = ("ours", dtype, device, backend_name)
        if key not in self.models:
            self.models[key] = load_ours(self.folder, dtype, device, backend_name)
        return self.models[key]

    def theirs(self, dtype: torch.dtype, device: str):
        key = ("theirs", dtype, device)
        if key not in self.models:
            self.models[key] = load_theirs(self.folder, dtype, device)
        return self.models[key]


@torch.no_grad()
def reference_logits(hf_model, token_ids: list[int]) -> torch.Tensor:  # [len, vocab] float32
    input_ids = torch.tensor([token_ids], device=hf_model.device)
    return hf_model(input_ids).logits[0].float()


def paired_logits(
    runner: PagedRunner, hf_models: list, prompts: list[list[int]], follow_ups: list[list[list[int]]]
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Prefills all prompts in one packed step, then runs one step per entry of follow_ups; yields
    (ours [n, vocab], each hf model's logits for the same n tokens) per sequence and step."""
    for new_tokens in [prompts] + follow_ups:
        step_logits = runner.step(new_tokens)
        for seq_index, new in enumerate(new_tokens):
            full_sequence = runner.token_ids[seq_index]
            yield (step_logits[seq_index], *(reference_logits(m, full_sequence)[-len(new):] for m in hf_models))


def assert_close_logits(ours: torch.Tensor, reference: torch.Tensor, relative: float = FP32_RELATIVE) -> None:
    scale = reference.abs().max().item()
    error = (ours - reference).abs().max().item()
    assert error <= relative * scale + 1e-6, f"max abs diff {error:.3g} vs logit scale {scale:.3g}"


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).norm() / reference.float().norm()).item()


def assert_bf16_logits_close(ours: torch.Tensor, theirs: torch.Tensor, theirs_fp32: torch.Tensor) -> None:
    """ours, theirs (transformers bf16), theirs_fp32: [N, vocab], all logits of one run."""
    noise = relative_error(theirs, theirs_fp32)
    error = relative_error(ours, theirs)
    bound = max(BF16_RELATIVE, BF16_NOISE_FACTOR * noise)
    assert error < bound, f"bf16 logits off transformers' bf16 by {error:.3e} (bound {bound:.3e}, noise {noise:.3e})"
    fp32_error = relative_error(ours, theirs_fp32)
    assert fp32_error < max(BF16_RELATIVE, BF16_NOISE_FACTOR * noise), (
        f"bf16 logits off float32 by {fp32_error:.3e}, transformers' bf16 by {noise:.3e}"
    )
