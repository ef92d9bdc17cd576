"""Which top-level package may import which (docs/architecture.md, "Layering"), read from the source.

Every import counts, including the ones inside functions: a lazy import still ties two packages
together. Checked on the syntax tree, so nothing is imported and the test needs no GPU or Triton.
"""

import ast
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# package -> the Tandem packages it may import (third-party imports are not checked here)
ALLOWED_IMPORTS = {
    "protos": set(),
    "kernels": set(),
    "common": {"kernels", "protos"},
    "services": {"common", "protos"},
    "scripts": {"common", "protos"},
    "bench": {"common", "kernels", "protos", "services"},
    "tests": {"bench", "common", "kernels", "protos", "services", "scripts"},
}
LAYERED = ("protos", "kernels", "common", "services")  # inside these, sub-packages must not form cycles either


def _python_files(package: str) -> list[pathlib.Path]:
    return sorted(path for path in (REPO_ROOT / package).rglob("*.py") if "__pycache__" not in path.parts)


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package_of(path: pathlib.Path) -> str:
    module = _module_name(path)
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imported_modules(path: pathlib.Path) -> set[str]:
    """Absolute names of every module `path` imports, at module level or inside a function; a relative
    import is resolved against the file's own package."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _package_of(path).split(".")[: 1 - node.level or None] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return names


def import_graph(nodes_of) -> dict[str, set[str]]:
    """Edges between the Tandem packages named by `nodes_of(module name)` (None: not a node)."""
    graph: dict[str, set[str]] = {}
    for package in ALLOWED_IMPORTS:
        for path in _python_files(package):
            source = nodes_of(_module_name(path))
            for module in imported_modules(path):
                target = nodes_of(module)
                if source is not None and target is not None and target != source:
                    graph.setdefault(source, set()).add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}  # node -> "open" while on the stack, "done" after
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _top_level(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in ALLOWED_IMPORTS else None


def _sub_package(module: str) -> str | None:
    """`common.kv.layout` -> `common.kv`; `kernels.rope` -> `kernels` (one layer: its files are peers)."""
    parts = module.split(".")
    if parts[0] not in LAYERED:
        return None
    return ".".join(parts[:2]) if parts[0] in ("common", "services") else parts[0]


def test_every_package_imports_only_what_its_layer_allows():
    graph = import_graph(_top_level)
    forbidden = {(source, target) for source, targets in graph.items() for target in targets
                 if target not in ALLOWED_IMPORTS[source]}
    assert not forbidden, f"imports against the layering: {sorted(forbidden)}"


@pytest.mark.parametrize("package", ["kernels", "protos"])
def test_bottom_packages_import_nothing_of_tandem_above_them(package):
    for path in _python_files(package):
        above = {module for module in imported_modules(path) if _top_level(module) not in (None, package)}
        assert not above, f"{path.relative_to(REPO_ROOT)} imports {sorted(above)}"


@pytest.mark.parametrize("nodes_of", [_top_level, _sub_package], ids=["top-level", "sub-packages"])
def test_no_import_cycle_between_packages(nodes_of):
    cycle = find_cycle(import_graph(nodes_of))
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_checks_catch_a_lazy_upward_import_and_a_cycle(tmp_path):
    source = tmp_path / "kernel.py"
    source.write_text("import torch\n\ndef f():\n    from common.attention.metadata import AttentionMetadata\n")
    assert "common.attention.metadata" in imported_modules(source)
    assert find_cycle({"common.attention": {"kernels"}, "kernels": {"common.attention"}}) == [
        "common.attention", "kernels", "common.attention"]
    assert find_cycle({"services": {"common"}, "common": {"kernels", "protos"}}) is None
