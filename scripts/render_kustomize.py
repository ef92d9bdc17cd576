"""Renders a kustomization as `kubectl kustomize DIR` does, for the subset deploy/kubernetes uses, so the
tests (and a machine without kubectl) see exactly what an overlay deploys.

    python scripts/render_kustomize.py deploy/kubernetes/overlays/disaggregated > tandem.yaml

The subset (anything else in a kustomization is an error, never silently ignored):
- `resources`: YAML files (one or more documents) and directories holding a kustomization.yaml,
  rendered first, in order; two resources of one kind, namespace and name are an error;
- `patches`: JSON 6902 operations (add, remove, replace, test), inline (`patch:`) or in a file (`path:`),
  applied to the resource its `target` names by kind and name; a target matching nothing is an error;
- `namespace`: set on every namespaced resource;
- `images`: `name` -> `newName` and/or `newTag` in every container's image.
"""

from __future__ import annotations

import copy
import pathlib
import sys
from typing import Any

import yaml

KUSTOMIZATION_FILE = "kustomization.yaml"
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "patches", "namespace", "images"}
CLUSTER_SCOPED_KINDS = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                        "PersistentVolume", "StorageClass", "PriorityClass"}


class KustomizeError(ValueError):
    """The kustomization is outside the supported subset, or would not build."""


def render(directory: str | pathlib.Path) -> list[dict[str, Any]]:
    """The resources the kustomization in `directory` produces, in order."""
    directory = pathlib.Path(directory)
    path = directory / KUSTOMIZATION_FILE
    if not path.is_file():
        raise KustomizeError(f"{directory}: no {KUSTOMIZATION_FILE}")
    kustomization = yaml.safe_load(path.read_text()) or {}
    unsupported = set(kustomization) - SUPPORTED_FIELDS
    if unsupported:
        raise KustomizeError(f"{path}: unsupported fields {sorted(unsupported)}")
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        for resource in _load_resource(directory / entry):
            if any(_resource_id(r) == _resource_id(resource) for r in resources):
                raise KustomizeError(f"{path}: {_resource_id(resource)} is listed twice")
            resources.append(resource)
    for patch in kustomization.get("patches", []):
        _apply_patch(resources, patch, directory)
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED_KINDS:
                resource["metadata"]["namespace"] = kustomization["namespace"]
    for image in kustomization.get("images", []):
        _set_image(resources, image)
    return resources


def _load_resource(path: pathlib.Path) -> list[dict[str, Any]]:
    if path.is_dir():
        return render(path)
    if not path.is_file():
        raise KustomizeError(f"resource {path} does not exist")
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _resource_id(resource: dict[str, Any]) -> tuple[str, str, str]:
    metadata = resource.get("metadata", {})
    return resource["kind"], metadata.get("namespace", ""), metadata["name"]


def _apply_patch(resources: list[dict[str, Any]], patch: dict[str, Any], directory: pathlib.Path) -> None:
    target = patch.get("target", {})
    if set(target) - {"kind", "name"} or not target.get("kind") or not target.get("name"):
        raise KustomizeError(f"{directory}: a patch target needs exactly kind and name, got {target}")
    if ("patch" in patch) == ("path" in patch):
        raise KustomizeError(f"{directory}: a patch needs one of `patch` or `path`")
    text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
    operations = yaml.safe_load(text)
    if not isinstance(operations, list):
        raise KustomizeError(f"{directory}: only JSON 6902 patches (a list of operations) are supported")
    matches = [r for r in resources if r["kind"] == target["kind"] and r["metadata"]["name"] == target["name"]]
    if not matches:
        raise KustomizeError(f"{directory}: patch target {target['kind']}/{target['name']} matches nothing")
    for resource in matches:
        for operation in operations:
            apply_operation(resource, operation)


def _pointer(path: str) -> list[str]:
    """A JSON pointer's tokens ("/a/b~1c" -> ["a", "b/c"])."""
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer must start with '/': {path!r}")
    return [token.replace("~1", "/").replace("~0", "~") for token in path[1:].split("/")]


def _child(container: Any, token: str, path: str) -> Any:
    try:
        return container[int(token)] if isinstance(container, list) else container[token]
    except (KeyError, IndexError, ValueError, TypeError):
        raise KustomizeError(f"path {path!r}: {token!r} does not exist") from None


def apply_operation(document: dict[str, Any], operation: dict[str, Any]) -> None:
    """One JSON 6902 operation (RFC 6902: add, remove, replace, test), in place."""
    op, path = operation.get("op"), operation.get("path", "")
    *parents, last = _pointer(path)
    container = document
    for token in parents:
        container = _child(container, token, path)
    if op == "test":
        if _child(container, last, path) != operation["value"]:
            raise KustomizeError(f"test failed at {path!r}")
    elif op == "remove":
        _child(container, last, path)
        del container[int(last) if isinstance(container, list) else last]
    elif op == "replace":
        _child(container, last, path)
        container[int(last) if isinstance(container, list) else last] = copy.deepcopy(operation["value"])
    elif op == "add":
        value = copy.deepcopy(operation["value"])
        if isinstance(container, list):
            index = len(container) if last == "-" else int(last)
            if not 0 <= index <= len(container):
                raise KustomizeError(f"path {path!r}: index {index} is out of range")
            container.insert(index, value)
        elif isinstance(container, dict):
            container[last] = value
        else:
            raise KustomizeError(f"path {path!r}: the parent is neither an object nor a list")
    else:
        raise KustomizeError(f"unsupported JSON patch operation {op!r} at {path!r}")


def _set_image(resources: list[dict[str, Any]], image: dict[str, Any]) -> None:
    name = image["name"]
    for resource in resources:
        pod = resource.get("spec", {}).get("template", {}).get("spec", {})
        for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            current_name, _, current_tag = container["image"].partition(":")
            if current_name == name:
                container["image"] = f"{image.get('newName', current_name)}:{image.get('newTag', current_tag)}"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: render_kustomize.py DIRECTORY", file=sys.stderr)
        return 2
    try:
        resources = render(argv[0])
    except KustomizeError as error:
        print(f"render_kustomize: {error}", file=sys.stderr)
        return 1
    yaml.safe_dump_all(resources, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
