"""One set of real service processes shared by every e2e test (starting SmolLM2 services costs
seconds each on small machines):

    main system: `tandem serve` with 2 prefill + 2 decode workers and a frontend (real UCX on loopback)
    odd system:  a prefill worker with a 2 s KV lease, a decode worker with block size 32 (a layout
                 mismatch) and a frontend routing between them
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc
import pytest

from protos import generation_pb2_grpc
from tests.e2e.cluster import ENGINE_ARGS, Process, Processes

ODD_LEASE_SECONDS = 2.0
ODD_DECODE_BLOCK_SIZE = 32


@dataclass
class Cluster:
    frontend: str  # host:port of the main system's frontend
    prefill: list[str]
    decode: list[str]
    serve: Process  # the `tandem serve` launcher
    odd_frontend: str
    odd_prefill: str
    odd_decode: str

    @property
    def main_workers(self) -> dict[str, str]:
        return {**{a: "prefill" for a in self.prefill}, **{a: "decode" for a in self.decode}}

    @property
    def odd_workers(self) -> dict[str, str]:
        return {self.odd_prefill: "prefill", self.odd_decode: "decode"}


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("e2e-services")
    processes = Processes(log_dir)
    try:
        serve = processes.start("serve", ["serve", "--num-prefill", "2", "--num-decode", "2", "--port", "0",
                                          "--http-port", "0",
                                          "--log-dir", str(log_dir / "serve"), *ENGINE_ARGS])
        odd_prefill = processes.start("odd-prefill", ["prefill", "--port", "0", "--kv-lease-seconds",
                                                      str(ODD_LEASE_SECONDS), *ENGINE_ARGS])
        odd_decode = processes.start("odd-decode", ["decode", "--port", "0", "--block-size",
                                                    str(ODD_DECODE_BLOCK_SIZE), *ENGINE_ARGS])
        odd_prefill_address = f"localhost:{odd_prefill.ready_info()['port']}"
        odd_decode_address = f"localhost:{odd_decode.ready_info()['port']}"
        odd_frontend = processes.start("odd-frontend", ["frontend", "--port", "0", "--http-port", "-1",
                                                        "--prefill-addresses",
                                                        odd_prefill_address, "--decode-addresses", odd_decode_address])
        serve_info = serve.ready_info()
        yield Cluster(
            frontend=serve_info["frontend"], prefill=serve_info["prefill"], decode=serve_info["decode"],
            serve=serve, odd_frontend=f"localhost:{odd_frontend.ready_info()['port']}",
            odd_prefill=odd_prefill_address, odd_decode=odd_decode_address,
        )
    finally:
        processes.stop()


@pytest.fixture(scope="session")
def stub(cluster):
    with grpc.insecure_channel(cluster.frontend) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)
