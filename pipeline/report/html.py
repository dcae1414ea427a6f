"""report.html: the run over time, in charts, in one file that opens anywhere.

Drawn from usage.json's document alone (so `pipeline report OUT` redraws it from a folder).
Charts are pygal's, as SVG: pure Python, a 130 KB install with no dependency, 30 ms and a
few megabytes to draw a thousand intervals (Matplotlib took 2 s and 75 MB, more than the
whole million-line run; Plotly's inlined script alone is 4.8 MB). Each chart is an <img> of
a data: URL, which a browser never lets run a script or fetch anything, and the page's
Content-Security-Policy forbids both besides: the page holds no script of its own (pygal's
SVG carries its configuration in a script element, which inside an <img> is never run). Everything
from outside (model names, ids, messages, verdicts, notes) is escaped where it is written.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import math
import sys
from typing import Any

from pipeline.account.cost import money
from pipeline.account.timeline import joined, kind

KINDS = ("success", "429", "5xx", "error", "invalid")
COLOURS = {"success": "#33aa77", "429": "#ee9944", "5xx": "#cc3333", "error": "#888888", "invalid": "#aa55cc"}
SCOPE_COLOURS = ("#7755aa", "#aa7722", "#227799", "#995566")  # a pace per model
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{padding:.2em .7em;border-bottom:1px solid #eee;
text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}img{max-width:100%}
.note{color:#666}
"""
WIDTH = 1000
LABELS = 10  # time labels shown on an axis


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _num(value: Any) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.4g}"
    return "–" if value is None else _e(value)


def _table(head: list[str], rows: list[list[Any]], numeric_from: int = 1) -> str:
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in head), "</tr>"]
    for row in rows:
        cells = (
            f'<td class="n">{_num(c)}</td>' if i >= numeric_from else f"<td>{_e(c)}</td>"
            for i, c in enumerate(row)
        )
        out += ["<tr>", *cells, "</tr>"]
    return "".join([*out, "</table>"])


# -- the charts ---------------------------------------------------------------------------------


def _image(chart: Any, title: str) -> str:
    data = base64.b64encode(chart.render()).decode()
    return f'<img alt="{_e(title)}" src="data:image/svg+xml;base64,{data}">'


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


def _line(title: str, axis: str, labels: list[str], series: list[tuple[str, list[float | None], str]]) -> str:
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


def _bars(labels: list[str], values: list[float], title: str, axis: str) -> str:
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


def _over_time(length: float, points: list[dict[str, Any]]) -> list[str]:
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
        _line("Answers a second by kind, and the pace in force", "a second", labels, per_kind),
        _line("Latency percentiles and time to first token", "seconds", labels, latency),
        _line("Requests in flight and started", "requests", labels, flying),
    ]


# -- the page -----------------------------------------------------------------------------------


def html_report(doc: dict[str, Any]) -> str:
    stretches: list[dict[str, Any]] = doc.get("timeline", [])
    length, points = joined(stretches)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>Run report: {_e(doc['folder'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>Run report</h1><p>Folder <code>{_e(doc['folder'])}</code>, updated {_e(doc['updated'])}, "
        f"{len(doc['runs'])} run(s); {_e(money(doc['cost']['total']))} spent "
        f"({_e(doc['cost']['source'])}).</p>",
        "<h2>Requests</h2>",
        _table(["state", "lines"], [[k.replace("_", " "), v] for k, v in doc["requests"].items()]),
    ]
    parts.append("<h2>Over time</h2>")
    if points:
        parts += _over_time(length, points)
    else:
        parts.append("<p class='note'>No interval was recorded.</p>")
    models = doc["models"]
    parts.append("<h2>Tokens and cost by model</h2>")
    if models:
        names = list(models)
        parts.append(_bars(names, [m["total_tokens"] for m in models.values()], "Tokens by model", "tokens"))
        parts.append(_bars(names, [m["cost"]["total"] or 0.0 for m in models.values()], "Cost by model", "$"))
    parts.append(
        _table(
            ["model", "requests", "prompt", "completion", "total", "cost", "cost source"],
            [
                [
                    n,
                    m["requests"],
                    m["prompt_tokens"],
                    m["completion_tokens"],
                    m["total_tokens"],
                    money(m["cost"]["total"]),
                    m["cost"]["source"],
                ]
                for n, m in models.items()
            ],
        )
    )
    runs = _by_run(doc, stretches)
    parts.append("<h2>Tokens and cost by run</h2>")
    if runs:
        labels = [r[0] for r in runs]
        parts.append(_bars(labels, [r[1] + r[2] for r in runs], "Tokens by run", "tokens"))
        parts.append(_bars(labels, [r[3] for r in runs], "Cost by run", "$"))
    parts.append(
        _table(
            ["run", "tokens in", "tokens out", "cost", "exit", "note"],
            [[r[0], r[1], r[2], money(r[3]), r[4], r[5]] for r in runs],
            numeric_from=1,
        )
    )
    parts.append("<h2>Answers and failures</h2>")
    answers = doc["answers_by_status"]
    if answers:
        parts.append(
            _bars(list(answers), list(answers.values()), "Answers by status (every attempt)", "answers")
        )
    errors = doc["errors_by_code"]
    if errors:
        parts.append(_bars(list(errors), list(errors.values()), "Failures by code", "requests"))
    messages = doc.get("error_messages", {})
    parts.append(
        _table(
            ["code", "failures", "commonest messages"],
            [
                [c, n, " · ".join(f"{m} ({k:,})" for m, k in messages.get(c, {}).items())]
                for c, n in errors.items()
            ],
        )
        if errors
        else "<p class='note'>No request failed.</p>"
    )
    verdicts = doc["verdicts"]
    if verdicts:
        parts.append("<h2>Verdicts</h2>")
        parts.append(_bars(list(verdicts), list(verdicts.values()), "Verdicts", "results"))
        parts.append(_table(["verdict", "results"], [[v, n] for v, n in verdicts.items()]))
    slowest = doc.get("slowest", [])
    parts.append("<h2>Slowest requests</h2>")
    parts.append(
        _table(["custom_id", "latency (s)"], [[i, round(s, 3)] for s, i in slowest])
        if slowest
        else "<p class='note'>None yet.</p>"
    )
    parts.append("</body></html>")
    return "\n".join(parts)


def _by_run(
    doc: dict[str, Any], stretches: list[dict[str, Any]]
) -> list[tuple[str, int, int, float, Any, str]]:
    """Each run (a stretch of the timeline): its label, tokens in and out, cost, and the exit
    and note of its run record (none for a run killed before it could write one)."""
    records: dict[int, list[dict[str, Any]]] = {}  # by the second each started
    for run in doc["runs"]:
        try:
            started = dt.datetime.fromisoformat(str(run.get("started"))).timestamp()
        except ValueError:
            continue
        records.setdefault(round(started), []).append(run)
    out = []
    for stretch in stretches:
        points = stretch.get("points", [])
        shard = str(stretch.get("shard", ""))
        second = round(stretch["started"])
        near = [r for d in (0, -1, 1) for r in records.get(second + d, [])]
        # A merged set labels both by shard; a shard's own folder has its runs labelled only.
        run = next((r for r in near if not shard or str(r.get("shard", "")) == shard), {})
        when = dt.datetime.fromtimestamp(stretch["started"], dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        out.append(
            (
                f"{shard} {when}" if shard else when,
                sum(p["tokens_in"] for p in points),
                sum(p["tokens_out"] for p in points),
                sum(p["cost"] for p in points),
                run.get("exit", "killed?" if not run else ""),
                str(run.get("note", "")),
            )
        )
    return out
