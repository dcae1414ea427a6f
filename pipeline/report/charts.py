"""The report's charts: pygal's, as SVG. Pure Python, a 130 KB install with no dependency,
30 ms and a few megabytes to draw a thousand intervals (Matplotlib took 2 s and 75 MB, more
than the whole million-line run; Plotly's inlined script alone is 4.8 MB). Each is returned as
an <img> of a data: URL: pygal's SVG carries its configuration in a script element, which
inside an <img> is never run.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import sys
from typing import Any

from pipeline.account.timeline import kind

KINDS = ("success", "429", "5xx", "error", "invalid")
COLOURS = {"success": "#33aa77", "429": "#ee9944", "5xx": "#cc3333", "error": "#888888", "invalid": "#aa55cc"}
SCOPE_COLOURS = ("#7755aa", "#aa7722", "#227799", "#995566")  # a pace per model
WIDTH = 1000
LABELS = 10  # time labels shown on an axis


def _image(chart: Any, title: str) -> str:
    data = base64.b64encode(chart.render()).decode()
    return f'<img alt="{html.escape(title, quote=True)}" src="data:image/svg+xml;base64,{data}">'


def _pygal() -> Any:
    if "pygal" not in sys.modules:
        try:
            import importlib_metadata
        except ImportError:  # a pygal that no longer asks it
            import pygal
        else:
            # pygal looks for map plugins (not used here) on import, reading every installed
            # package's metadata: 30 of the 100 million instructions its import took. None, asked then.
            scan, importlib_metadata.entry_points = importlib_metadata.entry_points, _no_plugins
            try:
                import pygal  # noqa: F401
            finally:
                importlib_metadata.entry_points = scan
    # pygal hooks every later import of the process (for map plugins again), and the hook warns
    # on each: take it out again.
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "PluginImportFixer"]
    return sys.modules["pygal"]


def _no_plugins(**params: Any) -> Any:
    return sys.modules["importlib_metadata"].EntryPoints(())


def _style(colours: tuple[str, ...] = ()) -> Any:
    from pygal.style import Style

    return Style(
        font_family="system-ui, sans-serif",
        background="white",
        plot_background="white",
        colors=colours or ("#446699", "#33aa77", "#ee9944", "#cc3333", "#888888", "#aa55cc"),
    )


def line(title: str, axis: str, labels: list[str], series: list[tuple[str, list[float | None], str]]) -> str:
    chart = _pygal().Line(
        width=WIDTH,
        height=320,
        js=[],  # no script: pygal's tooltips would be fetched from its site
        show_dots=len(labels) < 30,
        dots_size=2,
        x_label_rotation=0,
        show_minor_x_labels=False,
        truncate_legend=40,
        legend_at_bottom=True,
        y_title=axis,
        style=_style(tuple(colour for _, _, colour in series)),
        allow_interruptions=True,
        # pygal steps its scale down by tens while the range is smaller than a few steps: a
        # range of float noise (a pace of 48.5 and 48.50000001) never ends. A floor ends it.
        order_min=-4,
    )
    chart.title = title
    chart.x_labels = labels
    chart.x_labels_major = labels[:: max(len(labels) // LABELS, 1)]
    for name, values, _ in series:
        chart.add(name[:40], [None if v is None else float(f"{v:.6g}") for v in values])
    return _image(chart, title)


def bars(labels: list[str], values: list[float], title: str, axis: str) -> str:
    chart = _pygal().HorizontalBar(
        width=WIDTH,
        height=max(160, 34 * len(labels) + 90),
        js=[],
        show_legend=False,
        x_title=axis,
        print_values=True,
        style=_style(),
        order_min=-4,
    )
    chart.title = title
    chart.x_labels = [str(label)[:60] for label in labels]
    chart.add(axis, [float(f"{v:.6g}") for v in values])
    return _image(chart, title)


def over_time(length: float, points: list[dict[str, Any]]) -> list[str]:
    labels = [dt.datetime.fromtimestamp(p["start"], dt.UTC).strftime("%H:%M:%S") for p in points]
    per_kind: list[tuple[str, list[float | None], str]] = []
    for k in KINDS:
        values = [
            sum(n for a, n in p["answers"].items() if kind(a) == k) / (p.get("seconds") or length)
            for p in points
        ]
        if any(values):
            per_kind.append((k, list(values), COLOURS[k]))
    paces = {str(p.get("pace_kind")) for p in points if p.get("pace")}
    # The slowest few models, each a line of its own colour: forty would be a tangle; the
    # rest are counted in the legend (usage.json's timeline holds every one).
    lowest: dict[str, float] = {}
    for p in points:
        for model, scope in p.get("scopes", {}).items():
            lowest[model] = min(lowest.get(model, math.inf), scope.get("pace") or math.inf)
    models = sorted(lowest, key=lambda model: (lowest[model], model))[: len(SCOPE_COLOURS)]
    more = len(lowest) - len(models)
    if paces:
        pace = [p.get("pace") for p in points]
        whose = "the account's pace" if models else "pace in force"
        per_kind.append((f"{whose} ({'/'.join(sorted(paces))})", pace, "#223366"))
    for i, model in enumerate(models):  # each model with a pace of its own
        pace = [p.get("scopes", {}).get(model, {}).get("pace") for p in points]
        per_kind.append((f"pace for {model}", pace, SCOPE_COLOURS[i]))
    if more:  # named in the legend alone, undrawn
        per_kind.append((f"{more:,} more models paced", [None] * len(points), "#bbbbbb"))
    if any(p.get("limit") for p in points):
        per_kind.append(("limit (given, stated or found)", [p.get("limit") for p in points], "#000000"))
    latency = [
        (name, [p.get(key) for p in points], colour)
        for key, name, colour in (
            ("latency_p50", "latency p50", "#446699"),
            ("latency_p90", "latency p90", "#7788bb"),
            ("latency_p99", "latency p99", "#aabbdd"),
            ("ttft_p50", "time to first token p50", "#33aa77"),
        )
        if any(p.get(key) is not None for p in points)
    ]
    flying = [
        ("in flight", [p.get("in_flight") for p in points], "#223366"),
        ("started / s", [p["started"] / (p.get("seconds") or length) for p in points], "#999999"),
    ]
    return [
        line("Answers a second by kind, and the pace in force", "a second", labels, per_kind),
        line("Latency percentiles and time to first token", "seconds", labels, latency),
        line("Requests in flight and started", "requests", labels, flying),
    ]
