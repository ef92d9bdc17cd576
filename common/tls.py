"""TLS (and mutual TLS) for Tandem's gRPC and HTTP hops: validated configs and the credentials they make.

    ServerTLS(certfile, keyfile, ca_certs, cert_reqs) ─► grpc_credentials()   (grpc.ssl_server_credentials)
                                                      └► uvicorn_kwargs()     (the HTTP server's ssl_* settings)
    ClientTLS(ca_certs, certfile, keyfile)             ─► grpc_credentials()   (grpc.ssl_channel_credentials)

Flags use vLLM's names (`--ssl-keyfile`, `--ssl-certfile`, `--ssl-ca-certs`, `--ssl-cert-reqs`);
`add_server_tls_args` / `add_client_tls_args` add them, `*_tls_from_args` turn them into configs
(None = plaintext). Files are PEM; keys must be unencrypted. A certificate must name the host its
clients dial (a DNS or IP subject alternative name): `localhost` and `127.0.0.1` for `tandem serve`.

gRPC servers either require and verify client certificates or never ask for one, so `cert_reqs` is
`ssl.CERT_NONE` (0) or `ssl.CERT_REQUIRED` (2, mutual TLS); CERT_OPTIONAL (1) is refused.
"""

from __future__ import annotations

import argparse
import os
import ssl
from dataclasses import dataclass

import grpc

_CERT_REQS_NAMES = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}


def parse_cert_reqs(text: str | int) -> ssl.VerifyMode:
    """'0' | '2' | 'none' | 'required' (vLLM passes the ssl module's integers) -> ssl.VerifyMode."""
    value = str(text).strip().lower()
    if value in _CERT_REQS_NAMES:
        return _CERT_REQS_NAMES[value]
    if value in ("0", "1", "2"):
        return ssl.VerifyMode(int(value))
    raise ValueError(f"cert_reqs: expected 0 (none) or 2 (required), got {text!r}")


def _check_readable(name: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"{name}: cannot read {path!r}: {exc.strerror or exc}") from None


def _check_pem_certificates(name: str, path: str) -> None:
    """`path` is readable and holds at least one PEM certificate (OpenSSL parses it)."""
    _check_readable(name, path)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=path)
    except ssl.SSLError as exc:
        raise ValueError(f"{name}: no PEM certificate in {path!r} ({exc.reason or exc})") from None


class _EncryptedKey(Exception):
    pass


def _refuse_password() -> bytes:
    raise _EncryptedKey  # instead of OpenSSL prompting on the terminal


def _check_cert_and_key(certfile: str, keyfile: str) -> None:
    """Both readable, PEM, and the key belongs to the certificate (checked by OpenSSL)."""
    _check_pem_certificates("certfile", certfile)
    _check_readable("keyfile", keyfile)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(certfile, keyfile, password=_refuse_password)
    except _EncryptedKey:
        raise ValueError(f"keyfile: {keyfile!r} is encrypted (only unencrypted keys are supported)") from None
    except ssl.SSLError as exc:
        raise ValueError(f"keyfile: {keyfile!r} is not the PEM private key of {certfile!r} "
                         f"({exc.reason or exc})") from None


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


@dataclass(frozen=True)
class ServerTLS:
    """How a server (gRPC or HTTP) speaks TLS; constructing one checks every file (ValueError)."""

    certfile: str  # PEM certificate this server presents (its chain may follow it in the file)
    keyfile: str  # PEM private key of `certfile`, unencrypted
    ca_certs: str | None = None  # PEM CA bundle that client certificates must chain to
    cert_reqs: ssl.VerifyMode = ssl.CERT_NONE  # CERT_REQUIRED: mutual TLS (clients without a valid cert are refused)

    def __post_init__(self) -> None:
        if not self.certfile:
            raise ValueError("certfile: a TLS server needs a certificate")
        if not self.keyfile:
            raise ValueError("keyfile: a TLS server needs its certificate's private key")
        if self.cert_reqs == ssl.CERT_OPTIONAL:
            raise ValueError("cert_reqs: 1 (optional) is not supported (gRPC either requires and verifies client "
                             "certificates or never asks for one): use 0 (none) or 2 (required)")
        if self.cert_reqs == ssl.CERT_REQUIRED and not self.ca_certs:
            raise ValueError("cert_reqs: 2 (required) needs the CA bundle client certificates must chain to")
        _check_cert_and_key(self.certfile, self.keyfile)
        if self.ca_certs:
            _check_pem_certificates("ca_certs", self.ca_certs)

    @property
    def is_mutual(self) -> bool:
        return self.cert_reqs == ssl.CERT_REQUIRED

    def grpc_credentials(self) -> grpc.ServerCredentials:
        """For `server.add_secure_port`; reads the files now."""
        return grpc.ssl_server_credentials(
            [(_read(self.keyfile), _read(self.certfile))],
            root_certificates=_read(self.ca_certs) if self.is_mutual else None,
            require_client_auth=self.is_mutual,
        )

    def uvicorn_kwargs(self) -> dict:
        """For `uvicorn.Config(...)`: the same certificate, key and client-certificate policy over HTTPS."""
        return {"ssl_certfile": self.certfile, "ssl_keyfile": self.keyfile, "ssl_ca_certs": self.ca_certs,
                "ssl_cert_reqs": int(self.cert_reqs)}


@dataclass(frozen=True)
class ClientTLS:
    """How a client dials a TLS server; constructing one checks every file (ValueError)."""

    ca_certs: str | None = None  # PEM CA bundle that verifies the server; None: gRPC's default roots
    certfile: str | None = None  # PEM client certificate, for servers that require one (mutual TLS)
    keyfile: str | None = None  # PEM private key of `certfile`, unencrypted

    def __post_init__(self) -> None:
        if self.certfile and not self.keyfile:
            raise ValueError("keyfile: a client certificate needs its private key")
        if self.keyfile and not self.certfile:
            raise ValueError("certfile: a client key needs its certificate")
        if self.certfile:
            _check_cert_and_key(self.certfile, self.keyfile)
        if self.ca_certs:
            _check_pem_certificates("ca_certs", self.ca_certs)

    def grpc_credentials(self) -> grpc.ChannelCredentials:
        """For `grpc.secure_channel` / `grpc.aio.secure_channel`; reads the files now."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_certs) if self.ca_certs else None,
            private_key=_read(self.keyfile) if self.keyfile else None,
            certificate_chain=_read(self.certfile) if self.certfile else None,
        )


def dial(address: str, tls: ClientTLS | None, options: list | None = None) -> grpc.Channel:
    """A blocking-API channel to `address`: TLS with `tls`, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.grpc_credentials(), options=options)


# ---- command-line flags (TANDEM_SSL_* environment variables are read when the parser is built) --------

def add_server_tls_args(parser: argparse.ArgumentParser, listeners: str) -> None:
    """vLLM's flags for a server's TLS; `listeners` names what they secure in --help (e.g. "gRPC")."""
    env = os.environ.get
    parser.add_argument("--ssl-certfile", default=env("TANDEM_SSL_CERTFILE"), metavar="PEM",
                        help=f"serve {listeners} over TLS with this certificate (env TANDEM_SSL_CERTFILE)")
    parser.add_argument("--ssl-keyfile", default=env("TANDEM_SSL_KEYFILE"), metavar="PEM",
                        help="the certificate's private key, unencrypted (env TANDEM_SSL_KEYFILE)")
    parser.add_argument("--ssl-ca-certs", default=env("TANDEM_SSL_CA_CERTS"), metavar="PEM",
                        help="CA bundle client certificates must chain to (env TANDEM_SSL_CA_CERTS)")
    parser.add_argument("--ssl-cert-reqs", default=env("TANDEM_SSL_CERT_REQS", "0"), metavar="{0,2}",
                        help="2 = require a client certificate signed by --ssl-ca-certs (mutual TLS); "
                             "0 = do not ask for one (default; env TANDEM_SSL_CERT_REQS)")


def server_tls_from_args(args: argparse.Namespace) -> ServerTLS | None:
    """The server's TLS from `add_server_tls_args`' flags; None (plaintext) without --ssl-certfile and
    --ssl-keyfile. ValueError (one line, naming the flag) on a bad value."""
    cert_reqs = with_flag_names("--ssl-", lambda: parse_cert_reqs(args.ssl_cert_reqs))
    if not args.ssl_certfile and not args.ssl_keyfile:
        if args.ssl_ca_certs or cert_reqs != ssl.CERT_NONE:
            raise ValueError("--ssl-ca-certs and --ssl-cert-reqs secure a TLS server: they need --ssl-certfile "
                             "and --ssl-keyfile")
        return None
    return with_flag_names("--ssl-", lambda: ServerTLS(args.ssl_certfile or "", args.ssl_keyfile or "",
                                                       args.ssl_ca_certs or None, cert_reqs))


def add_client_tls_args(parser: argparse.ArgumentParser) -> None:
    """A client's TLS flags; any of them turns TLS on."""
    env = os.environ.get
    parser.add_argument("--tls", action="store_true",
                        help="dial over TLS, verifying the server against gRPC's default roots unless --ssl-ca-certs")
    parser.add_argument("--ssl-ca-certs", default=env("TANDEM_SSL_CA_CERTS"), metavar="PEM",
                        help="dial over TLS, trusting this CA bundle (env TANDEM_SSL_CA_CERTS)")
    parser.add_argument("--ssl-certfile", default=env("TANDEM_SSL_CERTFILE"), metavar="PEM",
                        help="client certificate for servers that require one (env TANDEM_SSL_CERTFILE)")
    parser.add_argument("--ssl-keyfile", default=env("TANDEM_SSL_KEYFILE"), metavar="PEM",
                        help="the client certificate's private key (env TANDEM_SSL_KEYFILE)")


def client_tls_from_args(args: argparse.Namespace) -> ClientTLS | None:
    """The client's TLS from `add_client_tls_args`' flags; None (plaintext) when none is given.
    ValueError (one line, naming the flag) on a bad value."""
    if not (args.tls or args.ssl_ca_certs or args.ssl_certfile or args.ssl_keyfile):
        return None
    return with_flag_names("--ssl-", lambda: ClientTLS(args.ssl_ca_certs or None, args.ssl_certfile or None,
                                                       args.ssl_keyfile or None))


def with_flag_names(prefix: str, build):
    """`build()`; a ValueError's leading field name (every message here starts with one, e.g.
    "ca_certs: ...") becomes the flag that set it: prefix "--ssl-" gives "--ssl-ca-certs: ..."."""
    try:
        return build()
    except ValueError as exc:
        field_name, _, rest = str(exc).partition(":")
        raise ValueError(f"{prefix}{field_name.replace('_', '-')}:{rest}") from None
