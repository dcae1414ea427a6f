"""The report's charts: what each shows, drawn as SVG by `pipeline.report.svg` (Matplotlib took
2 s and 75 MB for a thousand intervals, more than the whole million-line run; Plotly's inlined
script alone is 4.8 MB; pygal, 40 million instructions a chart). Each is returned as an <img>
of a data: URL, which a browser never lets run a script or fetch anything.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import math
from typing import Any

from pipeline.account.timeline import kind
from pipeline.report.figures import figure
from pipeline.report.svg import bars_svg, escape, line_svg

KINDS = ("success", "429", "5xx", "error", "invalid")
COLOURS = {"success": "#33aa77", "429": "#ee9944", "5xx": "#cc3333", "error": "#888888", "invalid": "#aa55cc"}
SCOPE_COLOURS = ("#7755aa", "#aa7722", "#227799", "#995566")  # a pace per model
WIDTH = 1000
LABELS = 10  # time labels written on an axis, at most
NEVER = (("429", "no 429s"), ("5xx", "no 5xx answers"), ("error", "no errors"))  # said when none came
LABEL_WIDTH = 64  # pixels a time label takes, with a gap: closer ones overlap
# Round steps between the times written under a chart (seconds): the first interval of each.
STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def _image(svg: str, title: str) -> str:
    data = base64.b64encode(svg.encode()).decode()
    return f'<img alt="{escape(title)}" src="data:image/svg+xml;base64,{data}">'


def said(words: str) -> str:
    """What a chart with nothing to show says instead: an empty frame reads as a fault."""
    return f"<p class='note'>{escape(words)}</p>"


def _shows(values: list[float | None]) -> bool:
    return any(v is not None and math.isfinite(v) and v != 0 for v in values)


def line(
    title: str,
    axis: str,
    count: int,
    series: list[tuple[str, list[float | None], str]],
    *,
    marked: list[tuple[float, str]],
    unit: str,
    along: str,
    empty: str,
) -> str:
    if not any(_shows(values) for _, values, _ in series):
        return said(empty)
    svg = line_svg(
        title,
        axis,
        count,
        marked,
        [(name[:40], values, colour) for name, values, colour in series],
        width=WIDTH,
        height=320,
        dots=count < 30,
        unit=unit,
        along=along,
    )
    return _image(svg, title)


def bars(
    labels: list[str],
    values: list[float],
    title: str,
    axis: str,
    *,
    unit: str = "",
    empty: str = "Nothing to draw: every value is zero.",
) -> str:
    if not _shows(list(values)):
        return said(empty)
    svg = bars_svg(
        title,
        axis,
        [str(label)[:60] for label in labels],
        [float(v) for v in values],
        width=WIDTH,
        height=max(160, 34 * len(labels) + 90),
        colour="#446699",
        unit=unit,
    )
    return _image(svg, title)


def local(when: float) -> dt.datetime:
    """A moment in the local time of the machine drawing the report, its zone attached."""
    return dt.datetime.fromtimestamp(when, dt.UTC).astimezone()


def zone(moment: dt.datetime) -> str:
    """The zone a local time is in, named: "CET, UTC+01:00" ("UTC" alone where it is UTC)."""
    offset = moment.strftime("%z")  # +0100
    utc = "UTC" if offset in ("", "+0000") else f"UTC{offset[:3]}:{offset[3:]}"
    name = moment.tzname() or ""
    return utc if not name or name == "UTC" or name[0] in "+-" else f"{name}, {utc}"


def marks(starts: list[float], offset: float, length: float) -> list[tuple[float, float]]:
    """Which times are written, and where: the first interval's start, then each round time of
    a step (10 s, a minute, an hour... in local time, `offset` seconds from UTC) placed where it
    falls in the interval (of `length`) that holds it, as a position counted in intervals (2.5:
    halfway through the third); the shortest step that writes at most LABELS, none closer to
    the one before than a label's width. A round time between two runs (in no interval) is
    written as the start of the interval after it, the time drawn there."""
    gap = math.ceil((len(starts) - 1) * LABEL_WIDTH / (WIDTH - 110))
    for step in STEPS:
        if step < gap * length:
            continue
        chosen = [(0.0, starts[0])] if starts else []
        for i in range(1, len(starts)):
            bucket = (starts[i] + offset) // step
            if bucket == (starts[i - 1] + offset) // step:
                continue
            moment = bucket * step - offset  # the round time last passed
            if moment < starts[i - 1] + length:  # in the interval before
                at = i - 1 + (moment - starts[i - 1]) / length
            else:  # (in a time between two runs, or at this interval's start)
                at, moment = float(i), starts[i]
            if at - chosen[-1][0] >= gap:
                chosen.append((at, moment))
                if len(chosen) > LABELS:
                    break
        else:
            return chosen
    return [(float(i), starts[i]) for i in range(0, len(starts), max(-(-len(starts) // LABELS), 1))]  # days


def _listed(words: list[str]) -> str:
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} and {words[-1]}"


def over_time(
    length: float, points: list[dict[str, Any]], *, retries: int | None = None, whose: str = "in this run"
) -> list[str]:
    """The charts over time (or the words that say why there are none), and what never happened
    in words: `retries` made in all, `whose` ("in this run") naming the runs drawn."""
    if len(points) < 2:
        point = points[0] if points else {"answers": {}}
        seconds = point.get("seconds") or length
        answers = sum(point["answers"].values())
        return [
            said(
                f"The run fits in one interval ({figure(seconds, 's')}, {answers:,} answers): "
                "nothing to draw over time. Its figures are above."
            )
        ]
    times = [local(p["start"]) for p in points]
    zones = {t.utcoffset(): t for t in times}  # (a change of clocks: two)
    along = f"local time ({'; '.join(zone(t) for t in zones.values())})"
    offset = times[0].utcoffset()
    marked = [
        (at, local(moment).strftime("%H:%M:%S"))
        for at, moment in marks(
            [p["start"] for p in points], offset.total_seconds() if offset else 0.0, length
        )
    ]
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
        named = "the account's pace" if models else "pace in force"
        per_kind.append((f"{named} ({'/'.join(sorted(paces))})", pace, "#223366"))
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
    seen = {kind(a) for p in points for a, n in p["answers"].items() if n}
    never = [words for k, words in NEVER if k not in seen]
    if retries == 0:
        never.append("no retries")
    drawn = functools.partial(line, count=len(points), marked=marked, along=along)
    return [
        drawn(
            title="Answers a second by kind, and the pace in force",
            axis="answers a second",
            series=per_kind,
            unit="/s",
            empty=f"No answer came back {whose}, and no pace was in force.",
        ),
        *([said(f"{_listed(never)[0].upper()}{_listed(never)[1:]} {whose}.")] if never else []),
        drawn(
            title="Latency percentiles and time to first token",
            axis="latency",
            series=latency,
            unit="s",
            empty=f"No latency to draw {whose}: no request was answered with a result.",
        ),
        drawn(
            title="Requests in flight and started",
            axis="requests",
            series=flying,
            unit="",
            empty=f"No request was sent {whose}.",
        ),
    ]
