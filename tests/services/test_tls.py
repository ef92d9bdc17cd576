"""TLS on every gRPC and HTTP hop, in one process: a frontend and workers that serve TLS (and mutual TLS),
the frontend dialing its workers over TLS, and clients that are refused without TLS or without a
certificate the CA signed. The KV itself moves over the `fake` transport here (UCX is never TLS)."""

from __future__ import annotations

import functools
import ssl
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common import healthcheck
from common.tls import ClientTLS, ServerTLS, dial
from protos import generation_pb2, generation_pb2_grpc
from services.common.server import start_server
from services.common.worker_cli import check_worker_argv
from services.decode.main import ROLE as DECODE
from services.frontend.main import build_parser as build_frontend_parser
from services.frontend.main import worker_tls_from_args
from services.frontend.openai.server import start_http_server
from services.frontend.router import Router
from services.prefill.main import ROLE as PREFILL
from tests.helpers.tls_certs import Certs, make_certs
from tests.services import inprocess
from tests.services.inprocess import InProcessSystem
from tests.services.test_serve_checks import FakeLauncher, serve  # noqa: F401 (serve: a fixture)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


def _start_system(tiny_folder, tiny_model, server_tls: ServerTLS, worker_tls: ClientTLS) -> InProcessSystem:
    """An in-process system whose three gRPC servers serve `server_tls`; the frontend dials with `worker_tls`."""
    model, model_config = tiny_model
    with pytest.MonkeyPatch.context() as patch:  # every start_server of the system serves TLS
        patch.setattr(inprocess, "start_server", functools.partial(start_server, tls=server_tls))
        return InProcessSystem(tiny_folder, model, model_config,
                               frontend_overrides={"tls": server_tls, "worker_tls": worker_tls}).start()


@pytest.fixture(scope="module")
def tls_system(tiny_folder, tiny_model, certs):
    """TLS everywhere, no client certificates."""
    system = _start_system(tiny_folder, tiny_model, ServerTLS(str(certs.server_cert), str(certs.server_key)),
                           ClientTLS(str(certs.ca)))
    yield system
    system.stop()


@pytest.fixture(scope="module")
def mtls_system(tiny_folder, tiny_model, certs):
    """Mutual TLS everywhere: the frontend presents the server certificate (clientAuth) to the workers."""
    server_tls = ServerTLS(str(certs.server_cert), str(certs.server_key), str(certs.ca), ssl.CERT_REQUIRED)
    system = _start_system(tiny_folder, tiny_model, server_tls,
                           ClientTLS(str(certs.ca), str(certs.server_cert), str(certs.server_key)))
    yield system
    system.stop()


def _generate(address: str, tls: ClientTLS | None, max_tokens: int = 3) -> list[generation_pb2.GenerateResponse]:
    sampling = generation_pb2.SamplingParams(max_tokens=max_tokens)
    request = generation_pb2.GenerateRequest(text="Hello", sampling=sampling)
    with dial(address, tls) as channel:
        return list(generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=30))


def _refusal(address: str, tls: ClientTLS | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as error:
        _generate(address, tls)
    return error.value.code()


def test_tls_frontend_and_workers_serve_a_request_end_to_end(tls_system, certs):
    responses = _generate(tls_system.frontend_address, ClientTLS(str(certs.ca)))
    assert responses[-1].final.usage.completion_tokens == 3


def test_a_plaintext_client_is_refused_by_a_tls_server(tls_system):
    assert _refusal(tls_system.frontend_address, None) == grpc.StatusCode.UNAVAILABLE
    for address in (tls_system.prefill_address, tls_system.decode_address):
        with pytest.raises(grpc.RpcError) as error, grpc.insecure_channel(address) as channel:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_client_that_does_not_trust_the_servers_ca_is_refused(tls_system, certs):
    assert _refusal(tls_system.frontend_address, ClientTLS(str(certs.other_ca))) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_serves_a_client_with_a_certificate_of_the_ca(mtls_system, certs):
    responses = _generate(mtls_system.frontend_address,
                          ClientTLS(str(certs.ca), str(certs.client_cert), str(certs.client_key)))
    assert responses[-1].final.usage.completion_tokens == 3


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_mutual_tls_refuses_a_client_without_a_certificate_of_the_ca(mtls_system, certs, who):
    tls = (ClientTLS(str(certs.ca)) if who == "no certificate"
           else ClientTLS(str(certs.ca), str(certs.stranger_cert), str(certs.stranger_key)))
    assert _refusal(mtls_system.frontend_address, tls) == grpc.StatusCode.UNAVAILABLE


def test_a_frontend_reaches_mutual_tls_workers_only_with_tls_and_a_certificate(mtls_system, certs):
    async def is_healthy(tls: ClientTLS | None) -> bool:
        router = Router([mtls_system.prefill_address], [mtls_system.decode_address], tls=tls)
        try:
            await router.refresh()
            return all(worker.is_healthy for worker in router.workers)
        finally:
            await router.close()

    run = mtls_system.run
    assert run(is_healthy(ClientTLS(str(certs.ca), str(certs.client_cert), str(certs.client_key))))
    assert not run(is_healthy(ClientTLS(str(certs.ca))))
    assert not run(is_healthy(None))


def test_healthcheck_speaks_tls_when_told(mtls_system, certs, monkeypatch, capsys):
    for name in ("CA_CERTS", "CERTFILE", "KEYFILE"):
        monkeypatch.delenv(f"TANDEM_SSL_{name}", raising=False)
    address = mtls_system.prefill_address
    assert healthcheck.main(["--address", address]) == 1
    assert healthcheck.main(["--address", address, "--ssl-ca-certs", str(certs.ca)]) == 1  # no certificate
    assert healthcheck.main(["--address", address, "--ssl-ca-certs", str(certs.ca), "--ssl-certfile",
                             str(certs.client_cert), "--ssl-keyfile", str(certs.client_key)]) == 0
    monkeypatch.setenv("TANDEM_SSL_CA_CERTS", str(certs.ca))  # what a TLS service's container has
    monkeypatch.setenv("TANDEM_SSL_CERTFILE", str(certs.server_cert))
    monkeypatch.setenv("TANDEM_SSL_KEYFILE", str(certs.server_key))
    assert healthcheck.main(["--address", address]) == 0
    assert f"{address}: SERVING" in capsys.readouterr().out


# ---- the HTTP API -------------------------------------------------------------------------------------

def _https_context(certs: Certs, certfile=None, keyfile=None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if certfile:
        context.load_cert_chain(str(certfile), str(keyfile))
    return context


@pytest.fixture(scope="module")
def https_port(mtls_system, certs):
    """The mutual-TLS system's frontend serving its HTTP API too."""
    tls = ServerTLS(str(certs.server_cert), str(certs.server_key), str(certs.ca), ssl.CERT_REQUIRED)
    http = mtls_system.run(start_http_server(mtls_system.app, "127.0.0.1", 0, tls))
    http.mark_ready()
    yield http.port
    mtls_system.run(http.stop(1))


def test_the_http_api_serves_https_to_a_client_with_a_certificate(https_port, certs):
    context = _https_context(certs, certs.client_cert, certs.client_key)
    with urllib.request.urlopen(f"https://localhost:{https_port}/v1/models", context=context, timeout=10) as response:
        assert response.status == 200


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_the_https_api_refuses_plaintext_and_clients_without_a_certificate(https_port, certs, scheme):
    context = _https_context(certs) if scheme == "https" else None  # https: trusts the CA, has no certificate
    with pytest.raises(OSError):  # the server closes the connection (TLS 1.3 refuses after the client's finish)
        url = f"{scheme}://localhost:{https_port}/health"
        with urllib.request.urlopen(url, context=context, timeout=10) as response:
            response.read()


# ---- the command lines ------------------------------------------------------------------------------------

@pytest.mark.parametrize("role", [PREFILL, DECODE], ids=["prefill", "decode"])
def test_a_worker_checks_its_tls_flags_before_starting(role, certs):
    args = check_worker_argv(role, ["--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
                                    "--ssl-ca-certs", str(certs.ca), "--ssl-cert-reqs", "2"])
    assert args.ssl_cert_reqs == "2"
    with pytest.raises(ValueError, match="^--ssl-cert-reqs: 2 \\(required\\) needs the CA bundle"):
        check_worker_argv(role, ["--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
                                 "--ssl-cert-reqs", "2"])


def test_the_frontend_dials_workers_with_its_own_certificate_unless_told_otherwise(certs):
    def worker_tls(*argv: str) -> ClientTLS | None:
        return worker_tls_from_args(build_frontend_parser().parse_args(list(argv)))

    server = ["--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key)]
    assert worker_tls() is None
    assert worker_tls(*server, "--ssl-ca-certs", str(certs.ca)) == ClientTLS(str(certs.ca), *server[1::2])
    assert worker_tls(*server, "--worker-ssl-ca-certs", str(certs.ca), "--worker-ssl-certfile",
                      str(certs.client_cert), "--worker-ssl-keyfile", str(certs.client_key)) == ClientTLS(
        str(certs.ca), str(certs.client_cert), str(certs.client_key))
    assert worker_tls("--worker-ssl-ca-certs", str(certs.ca)) == ClientTLS(str(certs.ca))  # plaintext API, TLS workers
    with pytest.raises(ValueError, match="^--worker-ssl-keyfile: a client certificate needs its private key"):
        worker_tls("--worker-ssl-certfile", str(certs.client_cert))


def test_serve_hands_its_tls_flags_to_every_service(serve, certs):
    tls_argv = ["--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", str(certs.server_key),
                "--ssl-ca-certs", str(certs.ca), "--ssl-cert-reqs", "2"]
    code, argvs = serve("--model", "dummy:tiny", *tls_argv)
    assert code == 1 and set(argvs) == {"prefill-0", "decode-0", "frontend"}  # stopped at the frontend's wait
    for argv in argvs.values():
        start = argv.index("--ssl-certfile")
        assert argv[start:start + len(tls_argv)] == tls_argv
    assert FakeLauncher.instances[-1].health_tls == ClientTLS(str(certs.ca), str(certs.server_cert),
                                                              str(certs.server_key))


def test_serve_checks_its_tls_flags_before_starting_anything(serve, certs, capsys):
    code, argvs = serve("--model", "dummy:tiny", "--ssl-certfile", str(certs.server_cert))
    err = capsys.readouterr().err
    assert (code, argvs) == (2, None)
    assert err == "tandem serve: --ssl-keyfile: a TLS server needs its certificate's private key\n"
