"""`tandem serve` with mutual TLS: every service serves TLS only and requires a certificate of the CA;
the frontend reaches its workers over mutual TLS (a request is served end to end), `tandem generate`
and the healthcheck need the CA and a certificate, and plaintext callers are refused. The KV moves
over UCX between the workers, as without TLS."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.request

import grpc
import pytest

from common.healthcheck import check_health
from common.tls import ClientTLS
from tests.e2e.cluster import REPO_ROOT, TANDEM, Processes, service_env
from tests.helpers.tls_certs import Certs, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def tls_serve(tmp_path_factory, certs) -> dict:
    """The ready file of `tandem serve` (1 prefill, 1 decode worker) run with mutual TLS, and its process."""
    log_dir = tmp_path_factory.mktemp("serve-tls")
    processes = Processes(log_dir)
    try:
        serve = processes.start("serve", [
            "serve", "--port", "0", "--http-port", "0", "--host", "127.0.0.1", "--log-dir", str(log_dir / "logs"),
            "--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
            "--ssl-ca-certs", str(certs.ca), "--ssl-cert-reqs", "2",
            "--kv-cache-memory", "64MiB", "--max-model-len", "256",
        ])
        yield {**serve.ready_info(), "serve": serve}
    finally:
        processes.stop()


def _generate(frontend: str, *tls_argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*TANDEM, "generate", "--address", frontend, "--json", "--raw", "--max-tokens", "4",
                           *tls_argv, "Once upon a time"],
                          capture_output=True, text=True, timeout=120, env=service_env(), cwd=REPO_ROOT)


def test_a_client_with_a_certificate_of_the_ca_is_served_end_to_end(tls_serve, certs):
    result = _generate(tls_serve["frontend"], "--ssl-ca-certs", str(certs.ca), "--ssl-certfile",
                       str(certs.client_cert), "--ssl-keyfile", str(certs.client_key))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["completion_tokens"] == 4
    hint = f"tandem generate --address {tls_serve['frontend']} --ssl-ca-certs {certs.ca} --ssl-certfile CERT"
    assert hint in tls_serve["serve"].log_tail(100)


@pytest.mark.parametrize("tls_argv", [[], ["--ssl-ca-certs", "CA"]], ids=["plaintext", "no certificate"])
def test_a_client_without_tls_or_without_a_certificate_is_refused(tls_serve, certs, tls_argv):
    result = _generate(tls_serve["frontend"], *[str(certs.ca) if arg == "CA" else arg for arg in tls_argv])
    assert result.returncode == 1
    assert "UNAVAILABLE" in result.stderr


def test_every_service_answers_health_checks_over_mutual_tls_only(tls_serve, certs):
    tls = ClientTLS(str(certs.ca), str(certs.client_cert), str(certs.client_key))
    addresses = [tls_serve["frontend"], *tls_serve["prefill"], *tls_serve["decode"]]
    assert all(check_health(address, tls=tls) == "SERVING" for address in addresses)
    for address in addresses:
        for refused in (None, ClientTLS(str(certs.ca))):
            with pytest.raises(grpc.RpcError) as error:
                check_health(address, tls=refused)
            assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_http_api_is_https_with_client_certificates(tls_serve, certs):
    assert tls_serve["http"].startswith("https://")
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    with urllib.request.urlopen(f"{tls_serve['http']}/models", context=context, timeout=30) as response:
        assert response.status == 200
