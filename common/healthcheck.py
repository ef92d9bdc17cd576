"""gRPC health probe for container healthchecks (the grpc.health.v1 protocol, no extra binary).

    python -m common.healthcheck --address localhost:50061 [--service NAME] [--timeout 3]

Exits 0 when the server answers SERVING, 1 for any other status or an RPC error (unreachable,
timeout, unknown service), 2 for bad arguments. The empty service name asks about the whole server.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check_health(address: str, service: str = "", timeout_s: float = 3.0) -> str:
    """Returns the status name (e.g. "SERVING"); raises grpc.RpcError when the call fails."""
    if not address or ":" not in address:
        raise ValueError(f"address must be host:port, got {address!r}")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Exit 0 when a gRPC server reports SERVING.")
    parser.add_argument("--address", required=True, help="host:port of the gRPC server")
    parser.add_argument("--service", default="", help="service name to ask about ('' = whole server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    try:
        status = check_health(args.address, args.service, args.timeout)
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
