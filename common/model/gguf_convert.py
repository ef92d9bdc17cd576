"""Converts a GGUF file (llama.cpp) into an HF-style folder the rest of Tandem loads.

    model.gguf ──► out_dir/ config.json, generation_config.json, model*.safetensors (+ index),
                            tokenizer.json, tokenizer_config.json, chat_template.jinja

Tensors are dequantized with the `gguf` package. Which GGUF architectures convert, and how their
tensor names map to HF ones, is each model family's `GGUFMapping` (`common/model/families/`); the
metadata keys read here are llama.cpp's own, the same for every family. llama.cpp's converter permutes
the rows of Q and K of some architectures (`llama`: to its interleaved RoPE layout); `unpermute_rows`
undoes that so the weights work with HF's rotate-half RoPE. Writes into `out_dir`, which must
not exist: callers convert into a temp dir and rename (see `registry.converted_gguf_folder`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from common.model.architectures import family_for_gguf
from common.model.config import RopeScaling
from common.model.family import GGUFMapping, ModelFamily
from common.model.formats import DTYPE_NAMES
from common.model.layers import rope_inverse_frequencies

SHARD_BYTES = 2 * 2**30
LLAMA3_CANDIDATES = ((1.0, 4.0, 8192),)  # (low_freq_factor, high_freq_factor, original context)
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


class GGUFConversionError(ValueError):
    """The GGUF file holds something this converter cannot represent faithfully."""


def hf_tensor_name(gguf_name: str, mapping: GGUFMapping) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None for derived tensors."""
    if gguf_name == "rope_freqs.weight":
        return None  # folded into config.json's rope scaling
    if gguf_name in mapping.global_tensors:
        return mapping.global_tensors[gguf_name]
    match = _BLOCK_NAME.match(gguf_name)
    if match is None or match.group(2) not in mapping.block_tensors:
        raise GGUFConversionError(f"GGUF tensor {gguf_name!r} has no HF equivalent")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{mapping.block_tensors[part]}.{kind}"


def gguf_family(reader) -> ModelFamily:
    """The family that converts this file's `general.architecture` (llama.cpp's name, e.g. "qwen2")."""
    try:
        return family_for_gguf(_field(reader, "general.architecture"))
    except ValueError as error:
        raise GGUFConversionError(str(error)) from None


def unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute`: per head, rows (0, D/2, 1, D/2+1, ...) back to (0, 1, ..., D-1).

    llama.cpp viewed each head's D rows as [2, D/2] and transposed to [D/2, 2]; we view them as
    [D/2, 2] and transpose back. Works for weights [rows, cols] and biases [rows].
    """
    head_dim = weight.shape[0] // num_heads
    heads = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return heads.swapaxes(1, 2).reshape(weight.shape)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _float_field(reader, key: str, default: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.99999974e-06; keep the shortest decimal instead."""
    return float(str(np.float32(_field(reader, key, default))))


def _llama3_scaling_from_factors(factors: np.ndarray, head_dim: int, rope_theta: float) -> dict:
    """llama.cpp stores Llama 3 RoPE scaling as per-frequency divisors; find the config that made them."""
    base = rope_inverse_frequencies(head_dim, rope_theta, None)
    factor = float(factors.max())
    for low, high, original in LLAMA3_CANDIDATES:
        scaling = RopeScaling("llama3", factor, low, high, original)
        scaled = rope_inverse_frequencies(head_dim, rope_theta, scaling)
        if np.allclose((base / scaled).numpy(), factors, rtol=1e-3):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": original,
                    "rope_theta": rope_theta}
    raise GGUFConversionError("GGUF rope_freqs do not match any known llama3 RoPE scaling")


def hf_config_from_gguf(reader, storage_dtype: str) -> dict:
    """Builds the HF config.json dict from GGUF metadata (and which tensors exist)."""
    arch = _field(reader, "general.architecture")
    family = gguf_family(reader)
    hf_architecture = family.gguf.architectures[arch]
    tensor_names = {t.name for t in reader.tensors}
    num_heads = int(_field(reader, f"{arch}.attention.head_count"))
    num_kv_heads = _field(reader, f"{arch}.attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):
        raise GGUFConversionError("per-layer attention.head_count_kv is not supported")
    hidden_size = int(_field(reader, f"{arch}.embedding_length"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden_size // num_heads))
    if int(_field(reader, f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise GGUFConversionError("partial rotary embeddings (rope.dimension_count < head_dim) are not supported")
    token_embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    rope_theta = _float_field(reader, f"{arch}.rope.freq_base", 10000.0)
    rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    scaling_type = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling_type == "linear":
        factor = _float_field(reader, f"{arch}.rope.scaling.factor", 1.0)
        rope_parameters = {"rope_type": "linear", "factor": factor, "rope_theta": rope_theta}
    elif scaling_type not in ("none", None):
        raise GGUFConversionError(f"GGUF rope scaling {scaling_type!r} is not supported")
    if "rope_freqs.weight" in tensor_names:
        factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
        rope_parameters = _llama3_scaling_from_factors(np.asarray(factors, np.float32), head_dim, rope_theta)
    config = {
        "architectures": [hf_architecture],
        "model_type": family.architectures[hf_architecture],
        "vocab_size": int(token_embedding.shape[1]),
        "hidden_size": hidden_size,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": _float_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "dtype": storage_dtype,
    }
    return config | family.gguf.extra_config(arch, tensor_names)


def _dequantized_tensors(reader, config: dict, dtype: torch.dtype, show_progress: bool):
    """Yields (HF name, tensor) for every GGUF tensor, un-permuting Q/K where llama.cpp permuted them."""
    from gguf.quants import dequantize

    mapping = gguf_family(reader).gguf
    is_permuted = _field(reader, "general.architecture") in mapping.permuted_query_key
    for tensor in tqdm(reader.tensors, desc="Converting GGUF", unit="tensor", disable=not show_progress):
        name = hf_tensor_name(tensor.name, mapping)
        if name is None:
            continue
        array = dequantize(tensor.data, tensor.tensor_type)  # numpy, HF row-major [rows, cols]
        if is_permuted and ".self_attn.q_proj." in name:
            array = unpermute_rows(array, config["num_attention_heads"])
        elif is_permuted and ".self_attn.k_proj." in name:
            array = unpermute_rows(array, config["num_key_value_heads"])
        array = np.ascontiguousarray(array, dtype=np.float32)
        if not array.flags.writeable:  # F32 tensors are read-only views of the memory-mapped file
            array = array.copy()
        yield name, torch.from_numpy(array).to(dtype)


def _save_shard(out_dir: Path, shard: dict[str, torch.Tensor], shard_files: list[list[str]]) -> None:
    save_file(shard, out_dir / f"shard-{len(shard_files):05d}.safetensors", metadata={"format": "pt"})
    shard_files.append(list(shard))
    shard.clear()


def _write_tensors(out_dir: Path, tensors, shard_bytes: int) -> None:
    """Writes model.safetensors, or shards plus model.safetensors.index.json, one shard in memory at a time."""
    shard_files: list[list[str]] = []  # names of the tensors in each written shard
    shard: dict[str, torch.Tensor] = {}
    shard_size = total_bytes = 0
    for name, tensor in tensors:
        if shard and shard_size + tensor.nbytes > shard_bytes:
            _save_shard(out_dir, shard, shard_files)
            shard_size = 0
        shard[name] = tensor
        shard_size += tensor.nbytes
        total_bytes += tensor.nbytes
    _save_shard(out_dir, shard, shard_files)
    if len(shard_files) == 1:
        (out_dir / "shard-00000.safetensors").rename(out_dir / "model.safetensors")
        return
    weight_map = {}
    for index, names in enumerate(shard_files):
        file_name = f"model-{index + 1:05d}-of-{len(shard_files):05d}.safetensors"
        (out_dir / f"shard-{index:05d}.safetensors").rename(out_dir / file_name)
        weight_map.update({name: file_name for name in names})
    index_json = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))


def _stop_token_ids(reader) -> list[int]:
    """eos plus llama.cpp's end-of-turn / end-of-message tokens (Llama 3 stops on <|eot_id|>)."""
    keys = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")
    ids: list[int] = []
    for key in keys:
        token_id = _field(reader, key)
        if token_id is not None and int(token_id) not in ids:
            ids.append(int(token_id))
    return ids


def _write_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(out_dir)


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: str = "auto",
    show_progress: bool = True,
    shard_bytes: int = SHARD_BYTES,
) -> None:
    """Writes the HF-style folder for `gguf_path` into `out_dir` (created; must not exist).

    dtype `auto` keeps float32 (exact dequantized values) below 1B parameters, bfloat16 above.
    The tokenizer is written only when the GGUF carries one (`tokenizer.ggml.model`).
    """
    from gguf import GGUFReader

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    reader = GGUFReader(gguf_path)
    if dtype == "auto":
        num_params = sum(int(t.n_elements) for t in reader.tensors)
        dtype = "float32" if num_params < 1_000_000_000 else "bfloat16"
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype must be auto or one of {DTYPE_NAMES}, got {dtype!r}")
    config = hf_config_from_gguf(reader, dtype)
    out_dir.mkdir(parents=True)
    tensors = _dequantized_tensors(reader, config, getattr(torch, dtype), show_progress)
    _write_tensors(out_dir, tensors, shard_bytes)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": _stop_token_ids(reader)}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    if "tokenizer.ggml.model" in reader.fields:
        _write_tokenizer(gguf_path, out_dir)
