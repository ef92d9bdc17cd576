#!/usr/bin/env python3
"""Draws one request's trace as a waterfall PNG: a bar per span, indented by depth, colored by service.

    python -m common.otlp_collector --port 4317 --out spans.json     # run the system against it, Ctrl-C
    python scripts/trace_waterfall.py spans.json --out waterfall.png [--trace-id HEX] [--list]

Without --trace-id it draws the most recent trace whose root is a `generate {model}` span.
Importable too: `draw_waterfall(spans, out_path)` returns the layout it drew (one Bar per span).
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common.otlp_collector import CollectedSpan, load_spans  # noqa: E402

SERVICE_COLORS = {"tandem-frontend": "#4C72B0", "tandem-prefill": "#DD8452", "tandem-decode": "#55A868"}
OTHER_COLORS = ("#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD")
ERROR_EDGE = "#C44E52"


@dataclasses.dataclass(frozen=True)
class Bar:
    """One span's row in the waterfall; times are ms from the trace's first span start."""

    span_id: str
    name: str
    service_name: str
    depth: int  # 0 for the root (and for spans whose parent never arrived)
    start_ms: float
    duration_ms: float
    color: str
    is_error: bool
    label: str


def pick_trace(spans: list[CollectedSpan], trace_id: str | None = None) -> list[CollectedSpan]:
    """The spans of `trace_id`, or of the latest trace rooted at a `generate ...` span."""
    if trace_id is not None:
        chosen = [s for s in spans if s.trace_id == trace_id.lower()]
        if not chosen:
            raise ValueError(f"trace_id {trace_id} not found among {len(spans)} spans")
        return chosen
    roots = [s for s in spans if not s.parent_span_id and s.name.startswith("generate ")]
    if not roots:
        roots = [s for s in spans if not s.parent_span_id] or spans
    if not roots:
        raise ValueError("no spans to draw")
    latest = max(roots, key=lambda s: s.start_ns)
    return [s for s in spans if s.trace_id == latest.trace_id]


def _service_colors(spans: list[CollectedSpan]) -> dict[str, str]:
    colors, num_other = {}, 0
    for service in sorted({s.service_name for s in spans}):
        if service in SERVICE_COLORS:
            colors[service] = SERVICE_COLORS[service]
        else:
            colors[service] = OTHER_COLORS[num_other % len(OTHER_COLORS)]
            num_other += 1
    return colors


def _label(span: CollectedSpan) -> str:
    service = span.service_name.removeprefix("tandem-")
    text = f"{service}: {span.name}"
    if "kv.bytes" in span.attributes:
        text += f"  {span.attributes['kv.bytes'] / 1e6:.2f} MB"
    if "kv.gbps" in span.attributes:
        text += f" @ {span.attributes['kv.gbps']:.1f} Gb/s"
    if "tandem.detokenize.busy_seconds" in span.attributes:  # the span covers first -> last token
        text += f"  busy {span.attributes['tandem.detokenize.busy_seconds'] * 1e3:.2f} ms"
    return text


def layout(spans: list[CollectedSpan]) -> list[Bar]:
    """Depth-first rows (children by start time), so every span sits right under its parent."""
    if not spans:
        raise ValueError("no spans to lay out")
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[CollectedSpan]] = {}
    roots = []
    for span in spans:
        if span.parent_span_id and span.parent_span_id in by_id:
            children.setdefault(span.parent_span_id, []).append(span)
        else:
            roots.append(span)
    origin_ns = min(s.start_ns for s in spans)
    colors = _service_colors(spans)
    bars: list[Bar] = []
    stack = [(root, 0) for root in sorted(roots, key=lambda s: s.start_ns, reverse=True)]
    while stack:
        span, depth = stack.pop()
        bars.append(Bar(
            span_id=span.span_id,
            name=span.name,
            service_name=span.service_name,
            depth=depth,
            start_ms=(span.start_ns - origin_ns) / 1e6,
            duration_ms=max(span.end_ns - span.start_ns, 0) / 1e6,
            color=colors[span.service_name],
            is_error=span.status == "ERROR",
            label=_label(span),
        ))
        for child in sorted(children.get(span.span_id, []), key=lambda s: s.start_ns, reverse=True):
            stack.append((child, depth + 1))
    return bars


def render(bars: list[Bar], out_path: str | pathlib.Path, title: str) -> int:
    """Writes the PNG; returns how many span bars the figure holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    height = 1.2 + 0.32 * len(bars)
    figure, axes = plt.subplots(figsize=(12, height))
    total_ms = max((b.start_ms + b.duration_ms for b in bars), default=1.0) or 1.0
    for row, bar in enumerate(bars):
        axes.barh(row, max(bar.duration_ms, total_ms * 0.002), left=bar.start_ms, height=0.7, color=bar.color,
                  edgecolor=ERROR_EDGE if bar.is_error else "none", linewidth=2 if bar.is_error else 0)
        axes.text(bar.start_ms + bar.duration_ms + total_ms * 0.005, row,
                  f"{bar.label}  ({bar.duration_ms:.2f} ms)", va="center", fontsize=8)
    num_bars = len(axes.patches)
    axes.set_yticks([])
    axes.invert_yaxis()
    axes.set_xlim(0, total_ms * 1.6)
    axes.set_xlabel("ms since the request started")
    axes.set_title(title, fontsize=10, loc="left")
    services = sorted({(b.service_name, b.color) for b in bars})
    axes.legend(handles=[Patch(color=c, label=s) for s, c in services], loc="lower right",
                bbox_to_anchor=(1.0, 1.0), ncol=max(len(services), 1), frameon=False, fontsize=8)
    figure.savefig(out_path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return num_bars


def draw_waterfall(spans: list[CollectedSpan], out_path: str | pathlib.Path, trace_id: str | None = None) -> list[Bar]:
    """Picks a trace, lays it out and writes the PNG; returns the layout drawn."""
    chosen = pick_trace(spans, trace_id)
    bars = layout(chosen)
    root = bars[0]
    title = f"{root.name}: {root.duration_ms:.1f} ms, {len(bars)} spans\ntrace {chosen[0].trace_id}"
    num_drawn = render(bars, out_path, title)
    if num_drawn != len(bars):
        raise RuntimeError(f"drew {num_drawn} bars for {len(bars)} spans")
    return bars


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("spans", help="JSON file written by `python -m common.otlp_collector --out`")
    parser.add_argument("--out", default="waterfall.png")
    parser.add_argument("--trace-id", default=None, help="hex trace id (default: latest generate trace)")
    parser.add_argument("--list", action="store_true", help="list the traces in the file and exit")
    args = parser.parse_args(argv)
    spans = load_spans(args.spans)
    if args.list:
        for span in sorted((s for s in spans if not s.parent_span_id), key=lambda s: s.start_ns):
            count = sum(1 for s in spans if s.trace_id == span.trace_id)
            print(f"{span.trace_id}  {span.name}  {span.duration_ns / 1e6:.1f} ms  {count} spans")
        return 0
    bars = draw_waterfall(spans, args.out, args.trace_id)
    print(f"wrote {args.out}: {len(bars)} spans")
    return 0


if __name__ == "__main__":
    sys.exit(main())
