"""compose.yaml: valid for docker-compose, GPUs/IPC/health wired as documented, runnable locally."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess

import pytest

from services.cli import SUBCOMMANDS
from tests.helpers.compose_commands import COMPOSE_PATH, REPO_ROOT, interpolate, load_compose, local_services

WORKERS = {"prefill": "0", "decode": "1"}


def _compose_command() -> list[str] | None:
    """Debian's docker-compose (1.29), or the `docker compose` v2 plugin where that exists."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=60)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose()


@pytest.mark.parametrize("variables", [{}, {"TANDEM_MODEL": "/models", "TANDEM_MODEL_DIR": "/tmp"}])
def test_docker_compose_config_accepts_the_file(variables):
    command = _compose_command()
    if command is None:
        if os.environ.get("CI"):
            pytest.fail("CI needs docker-compose (Debian package docker-compose) to validate compose.yaml")
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    result = subprocess.run(
        [*command, "-f", str(COMPOSE_PATH), "config"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, env={**env, **variables},
    )
    assert result.returncode == 0, result.stderr
    expected_model = variables.get("TANDEM_MODEL", "/opt/tandem/models/SmolLM2-135M-Instruct.gguf")
    assert expected_model in result.stdout
    assert "WARNING" not in result.stderr, result.stderr


def test_workers_get_one_gpu_each_and_share_ipc_and_pid(compose):
    services = compose["services"]
    for name, gpu in WORKERS.items():
        service = services[name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia"
        assert device["capabilities"] == ["gpu"]
        assert [interpolate(d, {}) for d in device["device_ids"]] == [gpu]
        assert service["ipc"] == "host"
        assert service["pid"] == "host" or service["pid"].startswith("service:")
        transports = service["environment"]["UCX_TLS"].split(",")
        assert {"cuda_ipc", "cuda_copy", "tcp"} <= set(transports)
    assert "deploy" not in services["frontend"], "the frontend only tokenizes: no GPU"


def test_jaeger_is_v2_with_ui_and_otlp(compose):
    jaeger = compose["services"]["jaeger"]
    assert re.fullmatch(r"jaegertracing/jaeger:2\.\d+\.\d+", jaeger["image"])
    published = {int(p.split(":")[-1]) for p in jaeger["ports"]}
    assert {16686, 4317} <= published
    for name in ("frontend", *WORKERS):
        command = compose["services"][name]["command"]
        assert command[command.index("--otlp-traces-endpoint") + 1] == "http://jaeger:4317"


def _duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"bad duration {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def test_healthchecks_probe_each_grpc_port(compose):
    for name in ("frontend", *WORKERS):
        service = compose["services"][name]
        test = service["healthcheck"]["test"]
        assert test[:4] == ["CMD", "python", "-m", "common.healthcheck"]
        assert importlib.util.find_spec(test[3]) is not None
        port = service["command"][service["command"].index("--port") + 1]
        assert test[test.index("--address") + 1] == f"localhost:{port}"
        min_start = 300 if name in WORKERS else 60  # model load + conversion + kernel compiles
        assert _duration_seconds(service["healthcheck"]["start_period"]) >= min_start


def test_decode_pulls_kv_only_from_the_prefill_worker(compose):
    prefill, decode = (compose["services"][name]["command"] for name in ("prefill", "decode"))
    kv_address = f"{prefill[prefill.index('--kv-host') + 1]}:{prefill[prefill.index('--kv-port') + 1]}"
    assert decode[decode.index("--allowed-kv-senders") + 1] == kv_address


def test_frontend_publishes_grpc_and_the_openai_http_api(compose):
    frontend = compose["services"]["frontend"]
    command = frontend["command"]
    assert command[command.index("--http-port") + 1] == "8000"
    assert {"50051:50051", "8000:8000"} <= set(frontend["ports"])


def test_frontend_waits_for_healthy_workers(compose):
    depends_on = compose["services"]["frontend"]["depends_on"]
    for name in WORKERS:
        assert depends_on[name]["condition"] == "service_healthy"
    assert depends_on["jaeger"]["condition"] == "service_started"  # tracing is best-effort


def test_model_cache_volume_and_model_mount(compose):
    assert "model-cache" in compose["volumes"]
    for name in ("frontend", *WORKERS):
        service = compose["services"][name]
        assert "model-cache:/cache" in service["volumes"]
        assert service["environment"]["TANDEM_CACHE_DIR"] == "/cache"
        assert any(v.endswith(":/models:ro") and "TANDEM_MODEL_DIR" in v for v in service["volumes"])
        command = service["command"]
        assert command[0] in SUBCOMMANDS
        model = command[command.index("--model") + 1]
        assert interpolate(model, {}) == "/opt/tandem/models/SmolLM2-135M-Instruct.gguf"
        assert interpolate(model, {"TANDEM_MODEL": "/models"}) == "/models"


def test_dockerfile_cuda_major_matches_ucx_and_entrypoint():
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    cuda_major = re.search(r"nvidia/cuda:(\d+)\.\d+\.\d+-\w+-ubuntu", dockerfile).group(1)
    assert set(re.findall(r"ucxx-cu(\d+)", dockerfile)) == {cuda_major}
    assert 'ENTRYPOINT ["tandem"]' in dockerfile
    # compose's default --model is the link the image makes to the embedded GGUF
    assert "'/opt/tandem/models'" in dockerfile and "'SmolLM2-135M-Instruct.gguf'" in dockerfile


def test_local_services_rewrite_hosts_and_ports():
    ports = iter(range(41000, 41100))
    services = local_services(
        variables={"TANDEM_MODEL": "dummy:tiny"},
        otlp_endpoint="http://127.0.0.1:4999",
        path_map={"/cache": "/tmp/tandem-cache"},
        port_factory=lambda: next(ports),
    )
    by_name = {s.name: s for s in services}
    assert [s.name for s in services][-1] == "frontend"  # after the workers it depends on
    assert set(by_name) == {"frontend", "prefill", "decode"}

    def flag(service, name):
        return service.argv[service.argv.index(name) + 1]

    prefill, decode, frontend = by_name["prefill"], by_name["decode"], by_name["frontend"]
    assert prefill.argv[:2] == ["tandem", "prefill"]
    assert flag(frontend, "--prefill-addresses") == f"127.0.0.1:{prefill.ports[50061]}"
    assert flag(frontend, "--decode-addresses") == f"127.0.0.1:{decode.ports[50071]}"
    assert flag(prefill, "--port") == str(prefill.ports[50061])
    assert flag(prefill, "--kv-port") == str(prefill.ports[50062])
    assert flag(prefill, "--kv-host") == "127.0.0.1"
    assert flag(decode, "--host") == "127.0.0.1"
    assert flag(decode, "--model") == "dummy:tiny"
    assert flag(decode, "--otlp-traces-endpoint") == "http://127.0.0.1:4999"
    all_ports = [p for s in services for p in s.ports.values()]
    assert flag(frontend, "--http-port") == str(frontend.ports[8000])
    assert len(all_ports) == len(set(all_ports)) == 8  # gRPC x3, metrics x3, the prefill KV listener, HTTP
    assert prefill.healthcheck_argv[-1] == f"127.0.0.1:{prefill.ports[50061]}"
    assert prefill.env["TANDEM_CACHE_DIR"] == "/tmp/tandem-cache"
    assert prefill.env["UCX_TLS"] == "cuda_ipc,cuda_copy,tcp"
    text = " ".join(" ".join(s.argv) + " " + " ".join(s.env.values()) for s in services)
    assert "jaeger" not in text and "0.0.0.0" not in text and "${" not in text


def test_local_services_without_tracing_drop_the_flag():
    for service in local_services(variables={}):
        assert "--otlp-traces-endpoint" not in service.argv
        assert "--metrics-port" in service.argv
