"""The Prometheus registry /metrics serves, and what the HTTP API records into it.

When the frontend app carries its own `ServiceMetrics` (attribute `metrics`), /metrics serves that
registry and the HTTP layer records nothing more (the shared request path already does). Otherwise the
HTTP layer owns a frontend-role `ServiceMetrics` and records what its clients saw, per choice:
time to first token, inter-token latency (one observation per streamed chunk), end-to-end latency and
finish reason, plus the number of open generation requests.
"""

from __future__ import annotations

import time

from common.metrics import ServiceMetrics, exposition_registry


class ChoiceClock:
    """Timing of one choice, from the moment its request was accepted."""

    def __init__(self):
        self.start = time.monotonic()
        self.last_token: float | None = None


class HttpMetrics:
    def __init__(self, app_metrics: ServiceMetrics | None, model_name: str):
        self.is_recording = app_metrics is None
        self.service_metrics = app_metrics or ServiceMetrics(role="frontend", model_name=model_name)
        self.registry = exposition_registry(self.service_metrics.registry)  # merged over API server processes
        self._num_open = 0

    def request_started(self) -> None:
        self._num_open += 1
        if self.is_recording:
            self.service_metrics.set_queue_sizes(num_running=self._num_open, num_waiting=0)

    def request_ended(self) -> None:
        self._num_open -= 1
        if self.is_recording:
            self.service_metrics.set_queue_sizes(num_running=self._num_open, num_waiting=0)

    def on_tokens(self, clock: ChoiceClock, num_tokens: int) -> None:
        if not self.is_recording or num_tokens == 0:
            return
        now = time.monotonic()
        if clock.last_token is None:
            self.service_metrics.observe_time_to_first_token(now - clock.start)
        else:
            self.service_metrics.observe_inter_token_latency(now - clock.last_token)
        clock.last_token = now

    def on_finished(self, clock: ChoiceClock, finished_reason: str) -> None:
        """finished_reason: stop / length / abort (client went away) / error."""
        if self.is_recording:
            self.service_metrics.observe_request_finished(finished_reason, time.monotonic() - clock.start)
