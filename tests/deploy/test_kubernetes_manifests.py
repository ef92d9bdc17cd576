"""deploy/kubernetes: every overlay renders (scripts/render_kustomize.py), validates with
kubernetes-validate for the Kubernetes version docs/kubernetes.md states, and is wired as the services
expect: each command is one `tandem` accepts, probes hit each service's gRPC health port, discovery
names headless Services of the right workers, Prometheus scrapes every metrics port."""

from __future__ import annotations

import importlib.util
import pathlib
import re
import sys

import kubernetes_validate
import pytest
import yaml

from services.cli import SUBCOMMANDS
from services.common.worker_cli import check_worker_argv
from services.decode import colocated as colocated_main
from services.decode import main as decode_main
from services.frontend import main as frontend_main
from services.frontend.app import FrontendConfig
from services.frontend.discovery import DnsSource, parse_source
from services.prefill import main as prefill_main

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
OVERLAYS_DIR = REPO_ROOT / "deploy" / "kubernetes" / "overlays"
OVERLAYS = sorted(path.name for path in OVERLAYS_DIR.iterdir() if (path / "kustomization.yaml").is_file())
WORKER_ROLES = {"prefill": prefill_main.ROLE, "decode": decode_main.ROLE, "worker": colocated_main.ROLE}
DECODE_SIDE = {"decode", "worker"}  # what --decode-discovery may point at
POD_IP = "10.1.2.3"


def _renderer():
    spec = importlib.util.spec_from_file_location("render_kustomize", REPO_ROOT / "scripts" / "render_kustomize.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


RENDER = _renderer().render


def validated_version() -> str:
    """The Kubernetes version docs/kubernetes.md says the manifests are validated for."""
    text = (REPO_ROOT / "docs" / "kubernetes.md").read_text()
    match = re.search(r"Validated Kubernetes version: \*\*(\d+\.\d+)\*\*", text)
    assert match, "docs/kubernetes.md must state 'Validated Kubernetes version: **X.Y**'"
    return match.group(1)


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> tuple[str, list[dict]]:
    return request.param, RENDER(OVERLAYS_DIR / request.param)


def _of_kind(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r["kind"] == kind]


def _tandem_containers(resources: list[dict]) -> list[tuple[dict, dict]]:
    """(deployment, container) for every container that runs `tandem`."""
    return [(d, c) for d in _of_kind(resources, "Deployment") for c in d["spec"]["template"]["spec"]["containers"]
            if c["image"].split(":")[0].endswith("tandem")]


def _argv(container: dict) -> list[str]:
    """The container's args with $(VAR) expanded as the kubelet does (downward-API values made up)."""
    values = {e["name"]: e.get("value", POD_IP) for e in container.get("env", [])}
    return [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], arg) for arg in container["args"]]


def _flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def _selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def _pod_labels(deployment: dict) -> dict:
    return deployment["spec"]["template"]["metadata"]["labels"]


def test_the_overlays_are_the_documented_ones():
    assert set(OVERLAYS) >= {"disaggregated", "colocated", "disaggregated-rdma"}
    docs = (REPO_ROOT / "docs" / "kubernetes.md").read_text()
    for name in OVERLAYS:
        assert f"overlays/{name}" in docs, f"docs/kubernetes.md does not mention overlays/{name}"


def test_every_overlay_validates_for_the_documented_kubernetes_version(overlay):
    name, resources = overlay
    version = validated_version()
    assert resources
    for resource in resources:
        try:
            # the schemas used: the newest the package has that is not newer than `version`
            assert kubernetes_validate.validate(resource, version, strict=True) == version
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{name}: {resource['kind']}/{resource['metadata']['name']}: {error.message}")
        assert resource["kind"] == "Namespace" or resource["metadata"]["namespace"] == "tandem"


def test_every_tandem_command_is_one_tandem_accepts(overlay):
    name, resources = overlay
    roles = set()
    for _, container in _tandem_containers(resources):
        argv = _argv(container)
        role = argv[0]
        assert role in SUBCOMMANDS, f"{name}: unknown tandem command {role!r}"
        roles.add(role)
        if role == "frontend":
            args = frontend_main.build_parser().parse_args(argv[1:])
            FrontendConfig([], [], prefill_discovery=args.prefill_discovery, decode_discovery=args.decode_discovery,
                           port=args.port)  # ValueError for a bad discovery spec or no decode side
        else:
            check_worker_argv(WORKER_ROLES[role], argv[1:])  # ValueError naming the flag
    assert "frontend" in roles and roles & DECODE_SIDE


def test_probes_are_grpc_health_on_each_services_port_and_workers_get_a_gpu(overlay):
    _, resources = overlay
    for deployment, container in _tandem_containers(resources):
        argv = _argv(container)
        port = int(_flag(argv, "--port"))
        assert {"name": "grpc", "containerPort": port} in container["ports"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, f"{deployment['metadata']['name']} {probe}"
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        assert gpus == (None if argv[0] == "frontend" else 1)


def test_discovery_resolves_headless_services_of_the_right_workers(overlay):
    name, resources = overlay
    deployments = {d["metadata"]["name"]: d for d in _of_kind(resources, "Deployment")}
    services = {s["metadata"]["name"]: s for s in _of_kind(resources, "Service")}
    ((_, frontend),) = [(d, c) for d, c in _tandem_containers(resources) if c["args"][0] == "frontend"]
    argv = _argv(frontend)
    for flag, roles in (("--prefill-discovery", {"prefill"}), ("--decode-discovery", DECODE_SIDE)):
        spec = _flag(argv, flag)
        if spec is None:
            continue
        source = parse_source(spec, flag)
        assert isinstance(source, DnsSource)
        service = services[source.host]
        assert service["spec"]["clusterIP"] == "None", f"{name}: {source.host} must be headless"
        assert source.port in [p["port"] for p in service["spec"]["ports"]]
        selected = [d for d in deployments.values() if _selects(service["spec"]["selector"], _pod_labels(d))]
        assert len(selected) == 1
        (container,) = selected[0]["spec"]["template"]["spec"]["containers"]
        assert container["args"][0] in roles
        assert int(_flag(_argv(container), "--port")) == source.port
    assert _flag(argv, "--decode-discovery") is not None


def test_every_service_selects_pods_and_targets_their_named_ports(overlay):
    _, resources = overlay
    deployments = _of_kind(resources, "Deployment")
    for service in _of_kind(resources, "Service"):
        selected = [d for d in deployments if _selects(service["spec"]["selector"], _pod_labels(d))]
        assert selected, f"Service {service['metadata']['name']} selects no pod"
        for deployment in selected:
            assert _selects(deployment["spec"]["selector"]["matchLabels"], _pod_labels(deployment))
            port_names = {p["name"] for c in deployment["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in port_names


def test_prometheus_scrapes_every_tandem_pod_on_its_metrics_port(overlay):
    _, resources = overlay
    (config_map,) = [c for c in _of_kind(resources, "ConfigMap") if c["metadata"]["name"] == "tandem-prometheus"]
    config = yaml.safe_load(config_map["data"]["prometheus.yml"])
    scraped = {(name, sd["port"]) for job in config["scrape_configs"] for sd in job["dns_sd_configs"]
               for name in sd["names"]}
    services = _of_kind(resources, "Service")
    for deployment, container in _tandem_containers(resources):
        metrics_port = int(_flag(_argv(container), "--metrics-port"))
        headless = [s["metadata"]["name"] for s in services if s["spec"].get("clusterIP") == "None"
                    and _selects(s["spec"]["selector"], _pod_labels(deployment))]
        assert any((name, metrics_port) in scraped for name in headless), deployment["metadata"]["name"]
        assert _flag(_argv(container), "--otlp-traces-endpoint") == "http://tandem-jaeger:4317"


def test_kv_workers_let_ucx_pick_rdma_or_tcp_and_advertise_their_pod_ip(overlay):
    _, resources = overlay
    for _, container in _tandem_containers(resources):
        role = container["args"][0]
        env = {e["name"]: e for e in container.get("env", [])}
        if role not in ("prefill", "decode"):
            assert "UCX_TLS" not in env
            continue
        excluded = env["UCX_TLS"]["value"]
        assert excluded.startswith("^") and set(excluded[1:].split(",")) == {"sm", "cuda_ipc"}
        if role == "prefill":
            assert container["args"][container["args"].index("--kv-host") + 1] == "$(POD_IP)"
            assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"


def test_only_decode_pods_reach_prefill_pods_on_any_port():
    resources = RENDER(OVERLAYS_DIR / "disaggregated")
    policies = {p["metadata"]["name"]: p["spec"] for p in _of_kind(resources, "NetworkPolicy")}
    labels = {d["metadata"]["name"]: _pod_labels(d) for d in _of_kind(resources, "Deployment")}
    for protected, peer in (("tandem-prefill", "tandem-decode"), ("tandem-decode", "tandem-prefill")):
        spec = policies[protected]
        assert _selects(spec["podSelector"]["matchLabels"], labels[protected])
        any_port = [rule for rule in spec["ingress"] if "ports" not in rule]
        assert len(any_port) == 1
        peers = [name for name, pod in labels.items()
                 if any(_selects(f["podSelector"]["matchLabels"], pod) for f in any_port[0]["from"])]
        assert peers == [peer]


def test_the_rdma_overlay_gives_kv_workers_a_device_and_memory_locking():
    resources = RENDER(OVERLAYS_DIR / "disaggregated-rdma")
    for _, container in _tandem_containers(resources):
        is_kv_worker = container["args"][0] in ("prefill", "decode")
        assert ("rdma/rdma_shared_device_a" in container["resources"]["limits"]) == is_kv_worker
        if is_kv_worker:
            assert container["securityContext"]["capabilities"]["add"] == ["IPC_LOCK"]
