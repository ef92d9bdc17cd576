"""TLS configs (`common.tls`): every file is checked up front, and a bad one is a one-line ValueError that
names the field (or, from the command line, the flag)."""

from __future__ import annotations

import argparse
import ssl
import subprocess

import grpc
import pytest

from common.tls import (
    ClientTLS,
    ServerTLS,
    add_client_tls_args,
    add_server_tls_args,
    client_tls_from_args,
    parse_cert_reqs,
    server_tls_from_args,
)
from tests.helpers.tls_certs import make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def _server_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_server_tls_args(parser, "gRPC")
    return parser.parse_args(list(argv))


def _client_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_client_tls_args(parser)
    return parser.parse_args(list(argv))


@pytest.fixture(autouse=True)
def no_tls_environment(monkeypatch):
    for name in ("CERTFILE", "KEYFILE", "CA_CERTS", "CERT_REQS"):
        monkeypatch.delenv(f"TANDEM_SSL_{name}", raising=False)


def test_a_valid_server_config_makes_grpc_credentials_and_uvicorn_settings(certs):
    tls = ServerTLS(str(certs.server_cert), str(certs.server_key), str(certs.ca), ssl.CERT_REQUIRED)
    assert tls.is_mutual
    assert isinstance(tls.grpc_credentials(), grpc.ServerCredentials)
    assert tls.uvicorn_kwargs() == {"ssl_certfile": str(certs.server_cert), "ssl_keyfile": str(certs.server_key),
                                    "ssl_ca_certs": str(certs.ca), "ssl_cert_reqs": 2}
    assert not ServerTLS(str(certs.server_cert), str(certs.server_key)).is_mutual


def test_a_valid_client_config_makes_channel_credentials(certs):
    assert isinstance(ClientTLS(str(certs.ca)).grpc_credentials(), grpc.ChannelCredentials)
    mutual = ClientTLS(str(certs.ca), str(certs.client_cert), str(certs.client_key))
    assert isinstance(mutual.grpc_credentials(), grpc.ChannelCredentials)
    assert isinstance(ClientTLS().grpc_credentials(), grpc.ChannelCredentials)  # gRPC's default roots


@pytest.mark.parametrize("make, message", [
    (lambda c, d: ServerTLS(str(d / "missing.pem"), str(c.server_key)), "certfile: cannot read '.*missing.pem'"),
    (lambda c, d: ServerTLS(str(c.server_cert), str(d / "missing.key")), "keyfile: cannot read '.*missing.key'"),
    (lambda c, d: ServerTLS(str(c.server_cert), ""), "keyfile: a TLS server needs its certificate's private key"),
    (lambda c, d: ServerTLS("", str(c.server_key)), "certfile: a TLS server needs a certificate"),
    (lambda c, d: ServerTLS(str(c.server_key), str(c.server_key)), "certfile: no PEM certificate in"),
    (lambda c, d: ServerTLS(str(c.server_cert), str(c.client_key)), "keyfile: .* is not the PEM private key of"),
    (lambda c, d: ServerTLS(str(c.server_cert), str(c.server_key), str(c.server_key)), "ca_certs: no PEM certificate"),
    (lambda c, d: ServerTLS(str(c.server_cert), str(c.server_key), str(c.ca), ssl.CERT_OPTIONAL),
     r"cert_reqs: 1 \(optional\) is not supported"),
    (lambda c, d: ServerTLS(str(c.server_cert), str(c.server_key), None, ssl.CERT_REQUIRED),
     r"cert_reqs: 2 \(required\) needs the CA bundle"),
    (lambda c, d: ClientTLS(None, str(c.client_cert)), "keyfile: a client certificate needs its private key"),
    (lambda c, d: ClientTLS(None, None, str(c.client_key)), "certfile: a client key needs its certificate"),
    (lambda c, d: ClientTLS(str(d / "missing-ca.pem")), "ca_certs: cannot read"),
    (lambda c, d: ClientTLS(str(c.ca), str(c.client_cert), str(c.server_key)), "keyfile: .* is not the PEM private"),
])
def test_bad_configs_are_one_line_errors_naming_the_field(certs, tmp_path, make, message):
    with pytest.raises(ValueError, match=message) as error:
        make(certs, tmp_path)
    assert "\n" not in str(error.value)


def test_an_encrypted_key_is_refused_without_prompting(certs, tmp_path):
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", str(certs.server_key), "-aes128", "-passout", "pass:secret",
                    "-out", str(encrypted)], check=True, capture_output=True)
    with pytest.raises(ValueError, match="keyfile: .* is encrypted"):
        ServerTLS(str(certs.server_cert), str(encrypted))


@pytest.mark.parametrize("text, mode", [("0", ssl.CERT_NONE), ("2", ssl.CERT_REQUIRED), ("none", ssl.CERT_NONE),
                                        ("Required", ssl.CERT_REQUIRED), (2, ssl.CERT_REQUIRED)])
def test_cert_reqs_takes_vllm_integers_and_names(text, mode):
    assert parse_cert_reqs(text) == mode


def test_server_flags_build_the_config_or_name_the_flag(certs):
    assert server_tls_from_args(_server_args()) is None
    tls = server_tls_from_args(_server_args("--ssl-certfile", str(certs.server_cert), "--ssl-keyfile",
                                            str(certs.server_key), "--ssl-ca-certs", str(certs.ca),
                                            "--ssl-cert-reqs", "2"))
    assert tls == ServerTLS(str(certs.server_cert), str(certs.server_key), str(certs.ca), ssl.CERT_REQUIRED)
    with pytest.raises(ValueError, match="^--ssl-keyfile: cannot read 'nope.key'"):
        server_tls_from_args(_server_args("--ssl-certfile", str(certs.server_cert), "--ssl-keyfile", "nope.key"))
    with pytest.raises(ValueError, match=r"^--ssl-cert-reqs: expected 0 \(none\) or 2 \(required\), got 'maybe'"):
        server_tls_from_args(_server_args("--ssl-cert-reqs", "maybe"))
    with pytest.raises(ValueError, match="^--ssl-ca-certs and --ssl-cert-reqs secure a TLS server"):
        server_tls_from_args(_server_args("--ssl-ca-certs", str(certs.ca)))


def test_server_flags_fall_back_to_the_environment(certs, monkeypatch):
    monkeypatch.setenv("TANDEM_SSL_CERTFILE", str(certs.server_cert))
    monkeypatch.setenv("TANDEM_SSL_KEYFILE", str(certs.server_key))
    assert server_tls_from_args(_server_args()) == ServerTLS(str(certs.server_cert), str(certs.server_key))


def test_client_flags_turn_tls_on_only_when_given(certs):
    assert client_tls_from_args(_client_args()) is None
    assert client_tls_from_args(_client_args("--tls")) == ClientTLS()
    assert client_tls_from_args(_client_args("--ssl-ca-certs", str(certs.ca))) == ClientTLS(str(certs.ca))
    with pytest.raises(ValueError, match="^--ssl-keyfile: a client certificate needs its private key"):
        client_tls_from_args(_client_args("--ssl-certfile", str(certs.client_cert)))
