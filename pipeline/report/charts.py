"""The report's charts: what each shows, drawn as SVG by `pipeline.report.svg` (Matplotlib took
2 s and 75 MB for a thousand intervals, more than the whole million-line run; Plotly's inlined
script alone is 4.8 MB; pygal, 40 million instructions a chart). Each is returned as an <img>
of a data: URL, which a browser never lets run a script or fetch anything.
"""

from __future__ import annotations

import base64
import datetime as dt
import math
from typing import Any

from pipeline.account.timeline import kind
from pipeline.report.svg import bars_svg, escape, line_svg

KINDS = ("success", "429", "5xx", "error", "invalid")
COLOURS = {"success": "#33aa77", "429": "#ee9944", "5xx": "#cc3333", "error": "#888888", "invalid": "#aa55cc"}
SCOPE_COLOURS = ("#7755aa", "#aa7722", "#227799", "#995566")  # a pace per model
WIDTH = 1000
LABELS = 10  # time labels written on an axis, at most


def _image(svg: str, title: str) -> str:
    data = base64.b64encode(svg.encode()).decode()
    return f'<img alt="{escape(title)}" src="data:image/svg+xml;base64,{data}">'


def line(title: str, axis: str, labels: list[str], series: list[tuple[str, list[float | None], str]]) -> str:
    svg = line_svg(
        title,
        axis,
        labels,
        labels[:: max(-(-len(labels) // LABELS), 1)],  # at most LABELS: written side by side, more overlap
        [(name[:40], values, colour) for name, values, colour in series],
        width=WIDTH,
        height=320,
        dots=len(labels) < 30,
    )
    return _image(svg, title)


def bars(labels: list[str], values: list[float], title: str, axis: str) -> str:
    svg = bars_svg(
        title,
        axis,
        [str(label)[:60] for label in labels],
        [float(v) for v in values],
        width=WIDTH,
        height=max(160, 34 * len(labels) + 90),
        colour="#446699",
    )
    return _image(svg, title)


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
