"""Which model family serves a checkpoint, by the HF `architectures` its config.json names.

Every module in `common/model/families/` defines `FAMILY` (a `ModelFamily`); they are found on first
use, so adding a family is adding its file (docs/architecture.md, "Adding a model family"). A name no
family knows fails with the list of the known ones.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from common.model.family import ModelFamily

FAMILIES_PACKAGE = "common.model.families"


@functools.cache
def all_families() -> tuple[ModelFamily, ...]:
    """Every family module's FAMILY, in module name order; two families may not claim one name."""
    package = importlib.import_module(FAMILIES_PACKAGE)
    families = []
    for module_info in sorted(pkgutil.iter_modules(package.__path__), key=lambda info: info.name):
        module = importlib.import_module(f"{FAMILIES_PACKAGE}.{module_info.name}")
        family = getattr(module, "FAMILY", None)
        if not isinstance(family, ModelFamily):
            raise TypeError(f"{module.__name__} must define FAMILY = ModelFamily(...)")
        families.append(family)
    check_distinct(families)
    return tuple(families)


def check_distinct(families: list[ModelFamily]) -> None:
    owners: dict[str, str] = {}
    for family in families:
        names = [*family.architectures, *family.model_types, *(family.gguf.architectures if family.gguf else ())]
        for name in dict.fromkeys(names):
            if owners.setdefault(name, family.name) != family.name:
                raise ValueError(f"model families {owners[name]!r} and {family.name!r} both claim {name!r}")


def known_architectures() -> list[str]:
    return sorted(name for family in all_families() for name in family.architectures)


def _unknown(what: str, value: Any) -> ValueError:
    return ValueError(f"{what} {value!r} is not supported (known architectures: {', '.join(known_architectures())})")


def family_for_architecture(architecture: str) -> ModelFamily:
    for family in all_families():
        if architecture in family.architectures:
            return family
    raise _unknown("architecture", architecture)


def family_for_model_type(model_type: str) -> ModelFamily:
    """The family of a ModelConfig's `architecture` (an HF model_type such as "qwen2")."""
    for family in all_families():
        if model_type in family.model_types:
            return family
    raise _unknown("model_type", model_type)


def family_for_hf_config(hf: dict[str, Any]) -> tuple[ModelFamily, str]:
    """(family, model_type) for a config.json: by its first `architectures` entry, or by `model_type` for
    configs written without one; both present must agree."""
    architectures = hf.get("architectures") or []
    model_type = hf.get("model_type")
    if not architectures:
        return family_for_model_type(model_type), model_type
    family = family_for_architecture(architectures[0])
    expected_type = family.architectures[architectures[0]]
    if model_type is not None and model_type != expected_type:
        raise ValueError(
            f"config.json names architecture {architectures[0]!r} with model_type {model_type!r}; "
            f"that architecture's model_type is {expected_type!r}"
        )
    return family, expected_type


def family_for_gguf(gguf_architecture: str) -> ModelFamily:
    """The family that converts GGUF files of llama.cpp's `general.architecture`."""
    for family in all_families():
        if family.gguf is not None and gguf_architecture in family.gguf.architectures:
            return family
    known = sorted(name for family in all_families() if family.gguf for name in family.gguf.architectures)
    raise ValueError(f"GGUF architecture {gguf_architecture!r} is not supported (supported: {', '.join(known)})")


def hf_architecture_name(model_type: str) -> str:
    """The HF `architectures` entry written for a ModelConfig's model_type (synthetic config.json files)."""
    family = family_for_model_type(model_type)
    return next(name for name, its_type in family.architectures.items() if its_type == model_type)
