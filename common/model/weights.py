"""Builds a model with its family and fills its weights: HF safetensors folders (single or sharded), or dummy.

GGUF files are first converted into an HF-style folder (`common/model/registry.py` caches that), so
this module reads only safetensors. The model is built on the meta device and materialised on
the target device in the target dtype, so no time is spent on an init that weights overwrite.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from common.attention import AttentionBackend, get_attention_backend
from common.model.architectures import family_for_model_type
from common.model.config import ModelConfig
from common.model.family import ModelFamily
from common.model.formats import DTYPE_ALIASES, DTYPE_NAMES, LOAD_FORMATS, canonical_dtype_name

# every accepted dtype name (aliases included) -> its torch dtype
DTYPES = {name: getattr(torch, canonical_dtype_name(name)) for name in (*DTYPE_NAMES, *DTYPE_ALIASES)}
PROGRESS_MIN_BYTES = 256 * 2**20  # smaller checkpoints load in well under a second: no bar


class WeightLoadError(ValueError):
    """The checkpoint does not fit the model: missing, unexpected or mis-shaped tensors."""


def safetensors_files(folder: str | Path) -> list[Path]:
    """The checkpoint files of an HF folder: the shards named by the index, or model.safetensors."""
    folder = Path(folder)
    index_path = folder / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index_path} has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"shards named by {index_path.name} are missing: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors weights in {folder} (pytorch .bin checkpoints are not supported)"
        )
    return files


def iterate_hf_weights(
    folder: str | Path, device: torch.device | str = "cpu", show_progress: bool | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (HF tensor name, tensor) from every shard; tensors are read straight onto `device`."""
    files = safetensors_files(folder)
    if show_progress is None:
        show_progress = sum(f.stat().st_size for f in files) >= PROGRESS_MIN_BYTES
    device_name = str(torch.device(device))
    with tqdm(total=len(files), desc="Loading shards", unit="shard", disable=not show_progress) as bar:
        for path in files:
            with safe_open(path, framework="pt", device=device_name) as reader:
                for name in reader.keys():
                    yield name, reader.get_tensor(name)
            bar.update(1)


@torch.no_grad()
def init_dummy_weights(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Fills every parameter with small normal noise (norm weights with 1), deterministically.

    Each parameter draws from its own generator seeded by (seed, parameter index), so two workers
    with the same seed, device type and dtype build identical models without sharing anything.
    """
    for index, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        generator = torch.Generator(device=param.device)
        generator.manual_seed(seed * 1_000_003 + index)
        param.normal_(0.0, std, generator=generator)


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, device: torch.device) -> torch.dtype:
    """`auto`: float32 on CPU (fast and exact there); elsewhere the checkpoint's dtype, bf16 for fp32."""
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
        return dtype
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    saved = DTYPES.get(config.torch_dtype or "bfloat16", torch.bfloat16)
    return torch.bfloat16 if saved == torch.float32 else saved


def build_empty_model(
    config: ModelConfig, attention_backend: AttentionBackend, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """The model of `config`'s family with uninitialised parameters allocated on `device` in `dtype`."""
    family = family_for_model_type(config.architecture)
    with torch.device("meta"):
        model = family.build_model(config, attention_backend)
    return model.to(dtype=dtype).to_empty(device=device)


@torch.no_grad()
def load_hf_weights(
    model: torch.nn.Module, family: ModelFamily, config: ModelConfig, weights: Iterable[tuple[str, torch.Tensor]]
) -> None:
    """Copies HF-named tensors into the model (cast to its dtype/device); all must be present."""
    params = dict(model.named_parameters())
    expected = set(family.weight_names(config))
    loaded: set[str] = set()
    unexpected: list[str] = []
    for hf_name, tensor in weights:
        target_slice = family.parameter_slice(hf_name, config)
        if target_slice is None:
            continue
        our_name, rows = target_slice
        if hf_name not in expected or our_name not in params:
            unexpected.append(hf_name)
            continue
        target = params[our_name].data if rows is None else params[our_name].data[rows]
        if tuple(target.shape) != tuple(tensor.shape):
            raise WeightLoadError(
                f"weight {hf_name!r} has shape {tuple(tensor.shape)}, the model expects {tuple(target.shape)}"
            )
        target.copy_(tensor)
        loaded.add(hf_name)
    if unexpected:
        raise WeightLoadError(f"checkpoint has {len(unexpected)} unexpected tensors: {sorted(unexpected)[:10]}")
    missing = sorted(expected - loaded)
    if missing:
        raise WeightLoadError(f"checkpoint is missing {len(missing)} tensors: {missing[:10]}")


def _pick_format(folder: Path | None, load_format: str) -> str:
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if load_format != "auto":
        return load_format
    if folder is None:
        raise ValueError("load_format 'auto' needs a model folder; pass load_format='dummy' with a model_config")
    return "gguf" if folder.suffix == ".gguf" else "safetensors"


def load_model(
    folder: str | Path | None,
    load_format: str,
    dtype: str | torch.dtype,
    device: torch.device | str,
    attention_backend: AttentionBackend | None,
    model_config: ModelConfig | None = None,
    seed: int = 0,
) -> tuple[torch.nn.Module, ModelConfig]:
    """Builds the model for an HF folder, a .gguf file (converted and cached) or dummy weights.

    `model_config` overrides the folder's config.json (dummy presets have no folder at all).
    """
    folder = Path(folder).expanduser() if folder is not None else None
    load_format = _pick_format(folder, load_format)
    if load_format == "gguf":
        from common.model.registry import converted_gguf_folder  # the converter needs the cache

        if folder is None or not folder.is_file():
            raise FileNotFoundError(f"load_format 'gguf' needs a .gguf file, got {folder}")
        folder, load_format = converted_gguf_folder(folder), "safetensors"
    if folder is not None and not folder.exists():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    if model_config is None:
        if folder is None:
            raise ValueError("load_model needs a model folder or a model_config")
        model_config = ModelConfig.from_folder(folder)
    device = torch.device(device)
    torch_dtype = resolve_dtype(dtype, model_config, device)
    backend = attention_backend or get_attention_backend("auto", device)
    model = build_empty_model(model_config, backend, torch_dtype, device)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    else:
        family = family_for_model_type(model_config.architecture)
        load_hf_weights(model, family, model_config, iterate_hf_weights(folder, device))
    return model.eval(), model_config
