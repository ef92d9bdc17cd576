"""One real Tandem system for the OpenAI API tests: `tandem serve` (a prefill worker, a decode worker and
the frontend with its HTTP API) on free ports, the embedded SmolLM2, CPU."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.cluster import Processes

_READY_TIMEOUT_SECONDS = 300.0


@dataclass
class TandemSystem:
    http_url: str  # e.g. http://localhost:8000/v1
    grpc_address: str  # frontend host:port
    prefill_addresses: list[str]
    decode_addresses: list[str]
    log_dir: Path


@pytest.fixture(scope="module")
def tandem_system(tmp_path_factory) -> TandemSystem:
    work_dir = tmp_path_factory.mktemp("tandem-serve")
    processes = Processes(work_dir)
    serve = processes.start("serve", [
        "serve", "--port", "0", "--http-port", "0", "--host", "127.0.0.1", "--log-dir", str(work_dir / "logs"),
        "--max-model-len", "1024", "--num-kv-blocks", "256", "--block-size", "16",
    ])
    try:
        ready = serve.ready_info(_READY_TIMEOUT_SECONDS)
        yield TandemSystem(ready["http"], ready["frontend"], ready["prefill"], ready["decode"], work_dir / "logs")
    finally:
        processes.stop()
