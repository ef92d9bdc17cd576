"""render_kustomize.py: the kustomize subset deploy/kubernetes uses, checked against kustomize's rules."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "render_kustomize.py"


@pytest.fixture(scope="module")
def kustomize():
    spec = importlib.util.spec_from_file_location("render_kustomize", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


DEPLOYMENT = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
spec:
  template:
    spec:
      containers:
        - name: app
          image: tandem:latest
          args: [frontend, --port, "1"]
          resources:
            limits: {}
"""
NAMESPACE = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: tandem\n"


def _write(directory: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for name, text in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
    return directory


def _base(tmp_path: pathlib.Path) -> pathlib.Path:
    return _write(tmp_path, {
        "base/kustomization.yaml": "namespace: tandem\nresources: [namespace.yaml, app.yaml]\n",
        "base/namespace.yaml": NAMESPACE, "base/app.yaml": DEPLOYMENT})


def test_an_overlay_patches_its_base_and_the_namespace_skips_cluster_scoped_kinds(kustomize, tmp_path):
    _base(tmp_path)
    _write(tmp_path, {"overlay/kustomization.yaml": """\
resources: [../base]
images:
  - {name: tandem, newName: registry.example/tandem, newTag: "1.2"}
patches:
  - target: {kind: Deployment, name: app}
    patch: |-
      - {op: add, path: /spec/template/spec/containers/0/args/-, value: --decode-discovery}
      - {op: replace, path: /spec/template/spec/containers/0/args/2, value: "2"}
      - {op: add, path: /spec/template/spec/containers/0/resources/limits/nvidia.com~1gpu, value: 1}
      - {op: add, path: /spec/template/spec/containers/0/args/0, value: first}
      - {op: remove, path: /spec/template/spec/containers/0/args/1}
"""})
    namespace, deployment = kustomize.render(tmp_path / "overlay")
    assert "namespace" not in namespace["metadata"]
    assert deployment["metadata"]["namespace"] == "tandem"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["first", "--port", "2", "--decode-discovery"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert container["image"] == "registry.example/tandem:1.2"


@pytest.mark.parametrize("kustomization, message", [
    ("resources: [app.yaml]\nnamePrefix: x-\n", "unsupported fields \\['namePrefix'\\]"),
    ("resources: [app.yaml, app.yaml]\n", "listed twice"),
    ("resources: [missing.yaml]\n", "does not exist"),
    ("resources: [app.yaml]\npatches:\n  - target: {kind: Deployment, name: other}\n    patch: '[]'\n",
     "matches nothing"),
    ("resources: [app.yaml]\npatches:\n  - target: {kind: Deployment, name: app}\n    patch: 'metadata: {}'\n",
     "only JSON 6902"),
    ("resources: [app.yaml]\npatches:\n  - target: {kind: Deployment, name: app}\n"
     "    patch: '[{op: replace, path: /spec/nothing, value: 1}]'\n", "'nothing' does not exist"),
    ("resources: [app.yaml]\npatches:\n  - target: {kind: Deployment, name: app}\n"
     "    patch: '[{op: test, path: /metadata/name, value: other}]'\n", "test failed"),
    ("resources: [app.yaml]\npatches:\n  - target: {kind: Deployment, name: app}\n"
     "    patch: '[{op: move, from: /a, path: /b}]'\n", "unsupported JSON patch operation 'move'"),
])
def test_what_is_outside_the_subset_or_would_not_build_is_an_error(kustomize, tmp_path, kustomization, message):
    _write(tmp_path, {"kustomization.yaml": kustomization, "app.yaml": DEPLOYMENT})
    with pytest.raises(kustomize.KustomizeError, match=message):
        kustomize.render(tmp_path)


def test_a_patch_from_a_file_and_the_command_line(kustomize, tmp_path, capsys):
    _write(tmp_path, {"kustomization.yaml": "resources: [app.yaml]\npatches:\n"
                                            "  - target: {kind: Deployment, name: app}\n    path: patch.yaml\n",
                      "app.yaml": DEPLOYMENT,
                      "patch.yaml": "- {op: add, path: /metadata/labels, value: {tier: web}}\n"})
    assert kustomize.main([str(tmp_path)]) == 0
    assert "tier: web" in capsys.readouterr().out
    assert kustomize.main([str(tmp_path / "nowhere")]) == 1
