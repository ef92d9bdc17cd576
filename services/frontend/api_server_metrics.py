"""Which API server process admitted the requests, on the frontend's /metrics.

    tandem:api_server_requests_total{model_name, role="frontend", api_server="0"}   streams admitted

With `--api-server-count N` one /metrics merges the N processes' metrics (counters summed), and this
series is the one that keeps them apart: how evenly the kernel spread the connections (SO_REUSEPORT
spreads connections, not requests, so one client's streams all land in one process). One count per
Generate stream admitted (an HTTP request: one per choice); a single process reports api_server="0".
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from common.metrics import PREFIX


class ApiServerMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str, api_server_index: int):
        if api_server_index < 0:
            raise ValueError(f"api_server_index must be >= 0, got {api_server_index}")
        requests = Counter(PREFIX + "api_server_requests", "Generation streams admitted, by API server process.",
                           ("model_name", "role", "api_server"), registry=registry)
        self._requests = requests.labels(model_name, "frontend", str(api_server_index))

    def request_admitted(self) -> None:
        self._requests.inc()
