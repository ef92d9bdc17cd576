"""Throwaway certificates for TLS tests, made with the `openssl` command line (EC P-256: fast).

    certs = make_certs(tmp_path)   # a CA; a server certificate for localhost and 127.0.0.1 (serverAuth and
                                   # clientAuth, as `tandem serve` uses one certificate for both); a client
                                   # certificate from the same CA; a client certificate from another CA
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_DAYS = "2"


@dataclass(frozen=True)
class Certs:
    ca: Path  # the CA every certificate below but the stranger's chains to
    server_cert: Path  # SAN localhost, 127.0.0.1; extendedKeyUsage serverAuth, clientAuth
    server_key: Path
    client_cert: Path  # extendedKeyUsage clientAuth
    client_key: Path
    other_ca: Path  # another CA (a client trusting only it must refuse the server)
    stranger_cert: Path  # a client certificate from the other CA (mutual TLS must refuse it)
    stranger_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, text=True)


def _make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(cert), "-days", _DAYS, "-subj", f"/CN=Tandem test {name}",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return cert, key


def _make_leaf(folder: Path, name: str, ca: tuple[Path, Path], extensions: str, serial: int) -> tuple[Path, Path]:
    cert, key, request, extfile = (folder / f"{name}{suffix}" for suffix in (".pem", ".key", ".csr", ".ext"))
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key),
             "-out", str(request), "-subj", f"/CN={name}")
    extfile.write_text(f"basicConstraints=CA:FALSE\n{extensions}\n")
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca[0]), "-CAkey", str(ca[1]), "-set_serial", str(serial),
             "-days", _DAYS, "-out", str(cert), "-extfile", str(extfile))
    return cert, key


def make_certs(folder: Path) -> Certs:
    folder.mkdir(parents=True, exist_ok=True)
    ca, other_ca = _make_ca(folder, "ca"), _make_ca(folder, "other-ca")
    server = _make_leaf(folder, "server", ca, "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
                                              "extendedKeyUsage=serverAuth,clientAuth", serial=2)
    client = _make_leaf(folder, "client", ca, "extendedKeyUsage=clientAuth", serial=3)
    stranger = _make_leaf(folder, "stranger", other_ca, "extendedKeyUsage=clientAuth", serial=4)
    return Certs(ca[0], *server, *client, other_ca[0], *stranger)
