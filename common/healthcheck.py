"""gRPC health probe for container healthchecks (the grpc.health.v1 protocol, no extra binary).

    python -m common.healthcheck --address localhost:50061 [--service NAME] [--timeout 3]
        [--tls | --ssl-ca-certs ca.pem] [--ssl-certfile cert.pem --ssl-keyfile key.pem]

Exits 0 when the server answers SERVING, 1 for any other status or an RPC error (unreachable,
timeout, unknown service, a TLS handshake that failed), 2 for bad arguments. The empty service name
asks about the whole server. Any TLS flag dials over TLS; like the services' flags they fall back to
TANDEM_SSL_CA_CERTS / TANDEM_SSL_CERTFILE / TANDEM_SSL_KEYFILE, so a container's healthcheck speaks
TLS when its service does (the certificate must then name the address dialed, e.g. localhost).
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.tls import ClientTLS, add_client_tls_args, client_tls_from_args, dial


def check_health(address: str, service: str = "", timeout_s: float = 3.0, tls: ClientTLS | None = None) -> str:
    """Returns the status name (e.g. "SERVING"); raises grpc.RpcError when the call fails.
    `tls`: dial over TLS (plaintext without it)."""
    if not address or ":" not in address:
        raise ValueError(f"address must be host:port, got {address!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    with dial(address, tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Exit 0 when a gRPC server reports SERVING.", allow_abbrev=False)
    parser.add_argument("--address", required=True, help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="service name to ask about ('' = whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    add_client_tls_args(parser)
    args = parser.parse_args(argv)
    try:
        status = check_health(args.address, args.service, args.timeout, client_tls_from_args(args))
    except ValueError as error:
        print(f"healthcheck: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        print(f"healthcheck: {args.address}: {error.code().name}: {error.details()}", file=sys.stderr)
        return 1
    print(f"{args.address}: {status}")
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
