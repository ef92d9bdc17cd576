"""The shape of a decoder model, parsed once from an HF `config.json` by the family that serves it.

The fields every decoder has (sizes, heads, RoPE, stop tokens, dtype) are read here
(`decoder_fields`); what differs between variants is data the family sets (Qwen2 has a bias on q/k/v,
Llama may have a bias on all four attention projections, Llama 3 rescales RoPE frequencies). Anything
a family cannot reproduce exactly is rejected with a ValueError that names the field, rather than
silently computing something else. Families: `common/model/families/`, found by
`common/model/architectures.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from common.model.formats import DTYPE_NAMES, canonical_dtype_name


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency rescaling: `llama3` (Llama 3.1+) or `linear` (position interpolation)."""

    rope_type: str  # "llama3" | "linear"
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def __post_init__(self) -> None:
        if self.rope_type not in ("llama3", "linear"):
            raise ValueError(
                f"rope_scaling.rope_type {self.rope_type!r} is not supported (supported: llama3, linear, none)"
            )
        if self.factor <= 0:
            raise ValueError(f"rope_scaling.factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3" and not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError("rope_scaling needs 0 < low_freq_factor < high_freq_factor for llama3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # the HF model_type, e.g. "llama" | "qwen2" | "mistral"; its family builds the model
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # SwiGLU inner width
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int  # < num_attention_heads means grouped-query attention
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v projections
    attention_output_bias: bool = False  # bias on o_proj (Llama `attention_bias`, never Qwen2)
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in, e.g. "bfloat16"

    def __post_init__(self) -> None:
        if not isinstance(self.architecture, str) or not self.architecture:
            raise ValueError(f"architecture must be an HF model_type such as 'llama', got {self.architecture!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rms_norm_eps <= 0:
            raise ValueError(f"rms_norm_eps must be > 0, got {self.rms_norm_eps}")
        if self.rope_theta <= 0:
            raise ValueError(f"rope_theta must be > 0, got {self.rope_theta}")
        if self.torch_dtype is not None and self.torch_dtype not in DTYPE_NAMES:
            raise ValueError(f"torch_dtype must be one of {DTYPE_NAMES}, got {self.torch_dtype!r}")
        if any(not isinstance(i, int) or i < 0 for i in self.eos_token_ids):
            raise ValueError(f"eos_token_ids must be non-negative integers, got {self.eos_token_ids!r}")

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], generation_config: dict[str, Any] | None = None) -> "ModelConfig":
        """Parses an HF config.json dict (transformers 4.x or 5.x layout) with the family that serves it."""
        from common.model.architectures import family_for_hf_config  # the families import this module

        family, model_type = family_for_hf_config(hf)
        return family.parse_config(hf, generation_config or {}, model_type)

    @classmethod
    def from_folder(cls, folder: str | Path) -> "ModelConfig":
        """Reads config.json (and generation_config.json when present) from an HF model folder."""
        folder = Path(folder)
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in model folder {folder}")
        hf = json.loads(config_path.read_text())
        generation_path = folder / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else None
        return cls.from_hf_config(hf, generation)

    @classmethod
    def llama_shape(cls, name: str) -> "ModelConfig":
        """A named preset shape, for dummy weights and benchmarks without a checkpoint."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r} (known: {sorted(PRESETS)})")
        return PRESETS[name]

    def with_overrides(self, **changes: Any) -> "ModelConfig":
        return replace(self, **changes)


REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def decoder_fields(hf: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig's keyword arguments that every decoder's config.json spells alike (all but
    `architecture` and the attention biases, which the family sets)."""
    for name in REQUIRED_FIELDS:
        if name not in hf:
            raise ValueError(f"config.json is missing {name!r}")
    num_heads = hf["num_attention_heads"]
    rope_theta, rope_scaling = _parse_rope(hf)
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_hidden_layers=hf["num_hidden_layers"],
        num_attention_heads=num_heads,
        num_key_value_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        eos_token_ids=_eos_token_ids(hf, generation),
        bos_token_id=generation.get("bos_token_id", hf.get("bos_token_id")),
        torch_dtype=_dtype_name(hf.get("dtype") or hf.get("torch_dtype")),
    )


def _parse_rope(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """transformers 5 writes `rope_parameters`; 4.x writes `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or params)
    rope_theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return rope_theta, None
    if rope_type not in ("llama3", "linear"):
        raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: llama3, linear, none)")
    if "factor" not in scaling:
        raise ValueError(f"rope_scaling of type {rope_type!r} is missing 'factor'")
    keys = ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    llama3_args = {k: scaling[k] for k in keys if k in scaling} if rope_type == "llama3" else {}
    if rope_type == "llama3" and len(llama3_args) != len(keys):
        raise ValueError(f"rope_scaling of type llama3 needs {keys}, got {sorted(scaling)}")
    return rope_theta, RopeScaling(rope_type=rope_type, factor=float(scaling["factor"]), **llama3_args)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _eos_token_ids(hf: dict[str, Any], generation: dict[str, Any]) -> tuple[int, ...]:
    """Union of both files, config.json first: instruct models often list extra stops in generation."""
    ids: list[int] = []
    for token_id in _as_id_list(hf.get("eos_token_id")) + _as_id_list(generation.get("eos_token_id")):
        if token_id not in ids:
            ids.append(token_id)
    return tuple(ids)


def _dtype_name(value: Any) -> str | None:
    if value is None:
        return None
    name = canonical_dtype_name(value)
    if name is None:
        raise ValueError(f"config dtype {value!r} is not supported (supported: {DTYPE_NAMES})")
    return name


PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(
        architecture="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        eos_token_ids=(2,), bos_token_id=1, torch_dtype="float32",
    ),
    "smollm2-135m": ModelConfig(
        architecture="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, eos_token_ids=(2,), bos_token_id=1,
        torch_dtype="bfloat16",
    ),
    "llama-3-8b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
        eos_token_ids=(128001, 128008, 128009), bos_token_id=128000, torch_dtype="bfloat16",
    ),
    "llama-3-70b": ModelConfig(
        architecture="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
        num_attention_heads=64, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192), max_position_embeddings=131072,
        eos_token_ids=(128001, 128008, 128009), bos_token_id=128000, torch_dtype="bfloat16",
    ),
    "qwen2-7b": ModelConfig(
        architecture="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, head_dim=128, rms_norm_eps=1e-6, rope_theta=1000000.0,
        max_position_embeddings=32768, attention_bias=True, eos_token_ids=(151645, 151643),
        bos_token_id=151643, torch_dtype="bfloat16",
    ),
    "mistral-7b": ModelConfig(
        architecture="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=1000000.0,
        max_position_embeddings=32768, eos_token_ids=(2,), bos_token_id=1, torch_dtype="bfloat16",
    ),
}
