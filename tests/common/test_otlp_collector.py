"""The collector as a standalone process: spans in over OTLP/gRPC, a JSON file out on SIGTERM."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from common import tracing
from common.otlp_collector import load_spans
from tests.helpers.compose_commands import free_port


def test_standalone_collector_writes_what_it_received(tmp_path, monkeypatch):
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    out, port = tmp_path / "spans.json", free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "common.otlp_collector", "--port", str(port), "--out", str(out)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert "collecting on" in process.stdout.readline()
        handle = tracing.init_tracing("decode", f"127.0.0.1:{port}")  # bare host:port is plaintext
        with handle.start_span(tracing.SpanName.KV_RECV) as span:
            tracing.set_kv_transfer(span, num_bytes=2_000_000, num_blocks=4, transport="ucx", seconds=0.01)
        assert handle.force_flush()
        handle.shutdown()
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    (span,) = load_spans(out)
    assert (span.name, span.service_name, span.parent_span_id) == ("kv.recv", "tandem-decode", "")
    assert span.attributes["kv.blocks"] == 4 and span.attributes["kv.gbps"] == pytest.approx(1.6)
    assert span.end_ns >= span.start_ns > 0


def test_load_spans_names_missing_fields(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([{"trace_id": "ab", "name": "x"}]))
    with pytest.raises(ValueError, match="span_id"):
        load_spans(path)
    path.write_text(json.dumps({"spans": []}))
    with pytest.raises(ValueError, match="JSON list"):
        load_spans(path)
