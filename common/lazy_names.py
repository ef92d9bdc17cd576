"""Package names that load their module on first use (PEP 562), so that importing a package for its
light parts (the frontend: layouts, handles, sampling parameters) never pulls in torch.

    __getattr__ = lazy_names(__name__, {"common.kv.kv_pool": ("KVPool", "num_blocks_for_budget")})
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(package: str, names_by_module: dict[str, tuple[str, ...]]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: a name listed under a module imports that module
    when it is first read."""
    module_of = {name: module for module, names in names_by_module.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module_of[name]), name)

    return __getattr__
