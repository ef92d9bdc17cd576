"""`tandem serve` brings the system up; `tandem generate` streams an answer from it."""

import json
import subprocess

from tests.e2e.cluster import REPO_ROOT, TANDEM, is_serving, service_env


def _generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TANDEM, "generate", *args], capture_output=True, text=True, timeout=180,
                          env=service_env(), cwd=REPO_ROOT)


def test_serve_prints_where_to_connect_and_every_service_is_healthy(cluster):
    log = cluster.serve.log_tail(200)
    assert f"Tandem is serving on {cluster.frontend}" in log
    assert f"tandem generate --address {cluster.frontend}" in log
    assert all(is_serving(address) for address in [cluster.frontend, *cluster.prefill, *cluster.decode])


def test_generate_answers_the_capital_of_france(cluster):
    result = _generate("--address", cluster.frontend, "What is the capital of France?")
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_generate_json_reports_tokens_finish_reason_and_usage(cluster):
    result = _generate("--address", cluster.frontend, "--json", "--max-tokens", "5", "--raw", "Once upon a time")
    assert result.returncode == 0, result.stderr
    completion = json.loads(result.stdout)
    assert completion["finish_reason"] in ("stop", "length")
    assert len(completion["token_ids"]) == completion["completion_tokens"] <= 5
    assert completion["prompt_tokens"] == 4 and completion["text"]


def test_generate_reports_a_bad_request_with_the_field(cluster):
    result = _generate("--address", cluster.frontend, "--temperature", "-1", "hi")
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and "sampling.temperature" in result.stderr
