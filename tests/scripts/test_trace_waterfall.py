"""trace_waterfall.py on synthetic spans shaped like one Tandem request."""

from __future__ import annotations

import importlib.util
import itertools
import pathlib
import sys

import pytest

from common.otlp_collector import CollectedSpan, save_spans

SCRIPT = pathlib.Path(__file__).resolve().parents[2] / "scripts" / "trace_waterfall.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MS = 1_000_000


@pytest.fixture(scope="module")
def waterfall():
    spec = importlib.util.spec_from_file_location("trace_waterfall", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _request_trace(trace_id: str, t0_ns: int) -> list[CollectedSpan]:
    """(name, service, parent name, start ms, end ms): the span tree of docs/observability.md."""
    rows = [
        ("generate tiny", "frontend", None, 0, 50),
        ("tokenize", "frontend", "generate tiny", 0.2, 1),
        ("route", "frontend", "generate tiny", 1, 1.2),
        ("/tandem.worker.v1.Prefill/Prefill", "frontend", "generate tiny", 1.3, 12),
        ("/tandem.worker.v1.Prefill/Prefill#server", "prefill", "/tandem.worker.v1.Prefill/Prefill", 1.5, 11.5),
        ("prefill.queue", "prefill", "/tandem.worker.v1.Prefill/Prefill#server", 1.6, 3),
        ("prefill.forward", "prefill", "/tandem.worker.v1.Prefill/Prefill#server", 3, 11),
        ("/tandem.worker.v1.Decode/Decode", "frontend", "generate tiny", 12, 49),
        ("/tandem.worker.v1.Decode/Decode#server", "decode", "/tandem.worker.v1.Decode/Decode", 12.2, 48.8),
        ("decode.queue", "decode", "/tandem.worker.v1.Decode/Decode#server", 12.3, 13),
        ("kv.recv", "decode", "/tandem.worker.v1.Decode/Decode#server", 13, 15),
        ("kv.send", "prefill", "kv.recv", 13.2, 14.8),
        ("decode.generate", "decode", "/tandem.worker.v1.Decode/Decode#server", 15, 48.5),
        ("detokenize", "frontend", "generate tiny", 49, 49.5),
    ]
    ids = {name: f"{trace_id[:8]}{index:08x}" for index, (name, *_rest) in enumerate(rows)}
    spans = []
    for name, service, parent, start_ms, end_ms in rows:
        attributes = {"kv.bytes": 3_000_000, "kv.gbps": 15.0} if name == "kv.send" else {}
        spans.append(CollectedSpan(
            trace_id=trace_id, span_id=ids[name], parent_span_id=ids[parent] if parent else "",
            name=name.split("#")[0], service_name=f"tandem-{service}", kind="INTERNAL", attributes=attributes,
            status="ERROR" if name == "decode.generate" else "UNSET", status_message="",
            start_ns=t0_ns + int(start_ms * MS), end_ns=t0_ns + int(end_ms * MS),
        ))
    return spans


def test_layout_is_depth_first_with_offsets(waterfall):
    spans = _request_trace("a" * 32, 10**18)
    bars = waterfall.layout(list(reversed(spans)))  # arrival order must not matter
    assert len(bars) == len(spans)
    names = [bar.name for bar in bars]
    assert names[:3] == ["generate tiny", "tokenize", "route"]
    prefill_client = names.index("/tandem.worker.v1.Prefill/Prefill")
    assert names[prefill_client + 1: prefill_client + 4] == [
        "/tandem.worker.v1.Prefill/Prefill", "prefill.queue", "prefill.forward"]
    assert names[names.index("kv.recv") + 1] == "kv.send"
    by_name = {bar.name: bar for bar in bars}
    assert by_name["generate tiny"].depth == 0
    assert by_name["kv.send"].depth == by_name["kv.recv"].depth + 1 == 4
    assert by_name["kv.send"].start_ms == pytest.approx(13.2)
    assert by_name["decode.generate"].duration_ms == pytest.approx(33.5)
    assert by_name["decode.generate"].is_error and not by_name["kv.recv"].is_error
    assert "3.00 MB @ 15.0 Gb/s" in by_name["kv.send"].label
    colors = {bar.service_name: bar.color for bar in bars}
    assert len(set(colors.values())) == 3
    for bar in bars:
        assert bar.color == colors[bar.service_name]


def test_picks_the_latest_generate_trace_and_draws_it(waterfall, tmp_path):
    old, new = _request_trace("b" * 32, 10**18), _request_trace("c" * 32, 10**18 + 5 * 10**9)
    stray = CollectedSpan("d" * 32, "1" * 16, "", "background", "other", "INTERNAL", {}, "UNSET", "",
                          10**18 + 9 * 10**9, 10**18 + 9 * 10**9 + MS)
    out = tmp_path / "waterfall.png"
    bars = waterfall.draw_waterfall(list(itertools.chain(old, [stray], new)), out)
    assert len(bars) == len(new)
    assert {bar.span_id for bar in bars} == {s.span_id for s in new}
    assert out.read_bytes()[:8] == PNG_MAGIC and out.stat().st_size > 10_000
    explicit = waterfall.draw_waterfall(old + new, tmp_path / "old.png", trace_id="B" * 32)
    assert {bar.span_id for bar in explicit} == {s.span_id for s in old}
    with pytest.raises(ValueError, match="trace_id"):
        waterfall.draw_waterfall(old, tmp_path / "none.png", trace_id="e" * 32)


def test_orphans_become_roots(waterfall):
    spans = _request_trace("f" * 32, 0)
    without_root = [s for s in spans if s.name != "generate tiny"]
    bars = waterfall.layout(without_root)
    assert len(bars) == len(without_root)
    assert sorted(b.name for b in bars if b.depth == 0) == sorted(
        ["tokenize", "route", "/tandem.worker.v1.Prefill/Prefill", "/tandem.worker.v1.Decode/Decode", "detokenize"])


def test_command_line_reads_a_json_dump(waterfall, tmp_path, capsys):
    dump = tmp_path / "spans.json"
    save_spans(_request_trace("1" * 32, 10**18), dump)
    out = tmp_path / "cli.png"
    assert waterfall.main([str(dump), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert waterfall.main([str(dump), "--list"]) == 0
    assert "1" * 32 in capsys.readouterr().out
