"""compose.yaml's services (the two-GPU pair; the single-GPU profile's colocated worker and its frontend)
run here as plain processes, exactly as compose starts them (command line and environment; hosts ->
127.0.0.1, ports -> free ones, Jaeger -> an in-process OTLP collector): each turns healthy by its own
compose healthcheck, the frontend answers on its published gRPC and HTTP ports, and one request leaves
one trace across the services.

The image's model link (/opt/tandem/models/SmolLM2-135M-Instruct.gguf) points at the embedded GGUF
here; /cache is this machine's Tandem cache, like compose's persistent `model-cache` volume, so the
GGUF conversion happens once, not on every run. UCX_TLS names CUDA transports: UCX skips them on CPU.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.request

import grpc
import pytest

from common.model.registry import embedded_gguf_path, models_cache_dir
from common.otlp_collector import OtlpCollector
from protos import generation_pb2 as g
from protos import worker_pb2
from protos.generation_pb2_grpc import GenerationStub
from protos.worker_pb2_grpc import DecodeWorkerStub
from tests.e2e.cluster import REPO_ROOT, Processes
from tests.e2e.observability_helpers import clean_env, scrape
from tests.helpers.compose_commands import LocalService, local_services

IMAGE_MODEL_DIR = "/opt/tandem/models"
MODEL_FILE = "SmolLM2-135M-Instruct.gguf"
HEALTHY_TIMEOUT_SECONDS = 300.0


def _is_healthy(service: LocalService) -> bool:
    """Runs the service's compose healthcheck (`python -m common.healthcheck ...`) here."""
    program, *rest = service.healthcheck_argv
    argv = [sys.executable, *rest] if program == "python" else service.healthcheck_argv
    return subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, timeout=30).returncode == 0


def _wait_healthy(services: list[LocalService], processes: Processes) -> None:
    deadline = time.monotonic() + HEALTHY_TIMEOUT_SECONDS
    pending = list(services)
    while pending:
        for process in processes.started:
            if process.popen.poll() is not None:
                raise RuntimeError(f"{process.name} exited with {process.popen.returncode}:\n{process.log_tail()}")
        pending = [s for s in pending if not _is_healthy(s)]
        if pending and time.monotonic() > deadline:
            raise RuntimeError(f"not healthy after {HEALTHY_TIMEOUT_SECONDS}s: {[s.name for s in pending]}")
        time.sleep(0.5)


@pytest.fixture
def compose_services(tmp_path):
    """compose's frontend, prefill and decode, healthy, with the collector that stands in for Jaeger."""
    with _running_compose(tmp_path) as started:
        yield started


@pytest.fixture
def single_gpu_services(tmp_path):
    """`docker compose --profile single-gpu up worker frontend-single-gpu`, healthy, with the collector."""
    with _running_compose(tmp_path, profiles=("single-gpu",), only=("worker", "frontend-single-gpu")) as started:
        yield started


@contextlib.contextmanager
def _running_compose(tmp_path, **selection):
    """The selected compose services as local processes, started in compose's order and healthy."""
    image_models = tmp_path / "image-models"
    image_models.mkdir()
    (image_models / MODEL_FILE).symlink_to(embedded_gguf_path())
    path_map = {IMAGE_MODEL_DIR: str(image_models), "/cache": str(models_cache_dir().parent),
                "/models": str(tmp_path / "host-models")}
    processes = Processes(tmp_path)
    with OtlpCollector() as collector:
        services = local_services(otlp_endpoint=collector.endpoint, path_map=path_map, **selection)
        try:
            started: list[LocalService] = []
            for service in services:  # compose's order: a service starts once what it depends on is healthy
                _wait_healthy([s for s in started if s.name in service.depends_on], processes)
                processes.start(service.name, service.argv[1:], {**clean_env(), **service.env})
                started.append(service)
            _wait_healthy(started, processes)
            yield {s.name: s for s in services}, collector
        finally:
            processes.stop()


def test_compose_services_turn_healthy_and_serve_one_traced_request(compose_services):
    services, collector = compose_services
    assert list(services) == ["prefill", "decode", "frontend"]
    _serve_one_traced_request(services, "frontend", collector,
                              {"frontend": 9100, "prefill": 9101, "decode": 9102})


def test_the_single_gpu_profile_serves_through_one_colocated_worker(single_gpu_services):
    services, collector = single_gpu_services
    assert list(services) == ["worker", "frontend-single-gpu"]
    _serve_one_traced_request(services, "frontend-single-gpu", collector, {"frontend-single-gpu": 9100, "worker": 9103})
    with grpc.insecure_channel(f"127.0.0.1:{services['worker'].ports[50063]}") as channel:
        stats = DecodeWorkerStub(channel).GetStats(worker_pb2.GetStatsRequest(), timeout=30)
    assert stats.num_requests_served == 1 and stats.num_transfers == 0  # prefilled there, no hand-off


def _serve_one_traced_request(services: dict[str, LocalService], frontend_name: str, collector,
                              metrics_ports: dict[str, int]) -> None:
    """One HTTP completion through the frontend; one trace across every service; each service's metrics
    labelled with its role (a compose service's name up to any "-")."""
    frontend = services[frontend_name]
    assert all(_is_healthy(s) for s in services.values())

    with grpc.insecure_channel(f"127.0.0.1:{frontend.ports[50051]}") as channel:
        model = GenerationStub(channel).GetModelInfo(g.GetModelInfoRequest(), timeout=30).model_name
    assert model == "SmolLM2-135M-Instruct"
    body = json.dumps({"model": model, "prompt": "The capital of France is", "max_tokens": 4,
                       "temperature": 0}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{frontend.ports[8000]}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        completion = json.loads(response.read())
    assert completion["usage"]["completion_tokens"] == 4

    roles = {name: name.split("-")[0] for name in services}

    def is_traced(spans) -> bool:
        roots = [s for s in spans if s.name == f"generate {model}"]
        return len(roots) == 1 and {s.service_name for s in spans if s.trace_id == roots[0].trace_id} == {
            f"tandem-{role}" for role in roles.values()}

    collector.wait_for_spans(is_traced, timeout=30)
    for name, metrics_port in metrics_ports.items():
        samples = scrape(services[name].ports[metrics_port])
        assert {labels.get("role") for _, labels, _ in samples if "role" in labels} == {roles[name]}
