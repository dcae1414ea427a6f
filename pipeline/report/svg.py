"""The two kinds of chart the report draws, written as SVG text: lines over time, and
horizontal bars. pygal drew them before, at some 40 million instructions a chart and 70
million to import (a third of a clean 10,000-request run's fixed cost over a bare aiohttp
loop); these few lines draw the same axes, series, legend and values for well under one.
No script, no outside reference: every piece of text is escaped where it is written.
"""

from __future__ import annotations

import math
import re

from pipeline.report.figures import figure

FONT = "system-ui, sans-serif"
GRID = "#e5e5e5"
INK = "#333333"
TICKS = 5  # about so many steps on a value axis
# What XML 1.0 cannot carry even escaped (a control character in a model's name, a lone
# surrogate): one in a chart and the browser draws none of it. Spelt as the few ranges XML
# leaves out, not as the negation of the ranges it allows: the same characters, compiled in
# 0.4 ms where the negation took 3.5 ms of every run's start.
NOT_XML = "[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]"


def escape(text: str) -> str:
    """html.escape(text, quote=True), without its module, which imports html.entities' 2,231
    names for unescape (7.6 million instructions of every run, under callgrind)."""
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#x27;")
    )


def _e(text: str) -> str:
    # None of NOT_XML's characters is printable (each is Cc, Cs or Cn): the pattern is
    # compiled (4 million instructions, still) only where a text may hold one.
    return escape(text if text.isprintable() else re.sub(NOT_XML, "\ufffd", text))


def scale(low: float, high: float) -> tuple[float, float, list[float]]:
    """A value axis over [low, high]: its ends and its ticks, at a round step (1, 2 or 5
    times a power of ten), from zero: a range of float noise (two p50s of 0.05282322718449553
    and ...52, where pygal's scale never ended) is drawn as the one value it is."""
    # Counts and rates read from zero; beyond 1e300 a value is drawn at the edge (a step
    # rounded past it would overflow).
    low, high = max(min(low, 0.0), -1e300), min(max(high, 0.0), 1e300)
    span = high - low
    if span < 1e-300:  # nothing but zeros
        high = span = 1.0
    raw = span / TICKS
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(low / step), math.ceil(high / step)
    ticks = [k * step for k in range(first, last + 1)]
    return ticks[0], ticks[-1], ticks


def _svg(width: int, height: int, title: str, body: list[str]) -> str:
    return "".join(
        [
            f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" font-family="{FONT}" font-size="12" fill="{INK}">',
            f'<rect width="{width}" height="{height}" fill="white"/>',
            f'<text x="{width / 2:g}" y="22" text-anchor="middle" font-size="16">{_e(title)}</text>',
            *body,
            "</svg>",
        ]
    )


def _legend(names: list[tuple[str, str]], width: int) -> list[list[tuple[float, str, str]]]:
    """Swatches and names in rows along the bottom: each row's (x, name, colour)."""
    rows: list[list[tuple[float, str, str]]] = [[]]
    x = 60.0
    for name, colour in names:
        size = 30 + 7 * len(name)
        if x + size > width - 20 and rows[-1]:
            x = 60.0
            rows.append([])
        rows[-1].append((x, name, colour))
        x += size
    return rows


def _drawn(rows: list[list[tuple[float, str, str]]], y: float) -> list[str]:
    out = []
    for row in rows:
        for x, name, colour in row:
            out.append(f'<rect x="{x:g}" y="{y - 9:g}" width="12" height="10" fill="{colour}"/>')
            out.append(f'<text x="{x + 17:g}" y="{y:g}">{_e(name)}</text>')
        y += 18
    return out


def line_svg(
    title: str,
    axis: str,
    count: int,
    marked: list[tuple[float, str]],
    series: list[tuple[str, list[float | None], str]],
    *,
    width: int,
    height: int,
    dots: bool,
    unit: str = "",
    along: str = "",
) -> str:
    """Each series a line over `count` points (a None breaks it); the labels `marked` written
    where they fall (each at a position counted in points: 2.5 is halfway from the third to the
    fourth), values in `unit` on the value axis, `along` under the labels."""
    legend = _legend([(name, colour) for name, _, colour in series], width)
    under = 18 if along else 0  # the line `along` takes
    left, right, top = 80.0, width - 30.0, 40.0
    bottom = height - 40.0 - under - 18 * len(legend)
    values = [v for _, vs, _ in series for v in vs if v is not None and math.isfinite(v)]
    low, high, ticks = scale(min(values, default=0.0), max(values, default=1.0))
    x_of = (right - left) / max(count - 1, 1)

    def y_of(v: float) -> float:  # past the axis's end (1e300), at its end: v - low overflowed
        return bottom - (min(max(v, low), high) - low) / (high - low) * (bottom - top)

    body = [
        f'<text transform="translate(18 {(top + bottom) / 2:g}) rotate(-90)" text-anchor="middle">'
        f"{_e(axis)}</text>"
    ]
    for t in ticks:
        y = y_of(t)
        body.append(f'<line x1="{left:g}" x2="{right:g}" y1="{y:.1f}" y2="{y:.1f}" stroke="{GRID}"/>')
        body.append(f'<text x="{left - 6:g}" y="{y + 4:.1f}" text-anchor="end">{_e(figure(t, unit))}</text>')
    for at, label in marked:
        if 0 <= at <= count - 1:
            body.append(
                f'<text x="{left + at * x_of:.1f}" y="{bottom + 16:g}" text-anchor="middle">{_e(label)}</text>'
            )
    if along:
        body.append(
            f'<text x="{(left + right) / 2:g}" y="{bottom + 34:g}" text-anchor="middle">{_e(along)}</text>'
        )
    for _, points, colour in series:
        runs: list[list[str]] = [[]]
        for i, v in enumerate(points):
            if v is None or not math.isfinite(v):
                runs.append([])
                continue
            cx, cy = f"{left + i * x_of:.1f}", f"{y_of(v):.1f}"
            runs[-1].append(f"{cx},{cy}")
            if dots:
                body.append(f'<circle cx="{cx}" cy="{cy}" r="2" fill="{colour}"/>')
        body += [
            f'<polyline points="{" ".join(run)}" fill="none" stroke="{colour}" stroke-width="1.5"/>'
            for run in runs
            if len(run) > 1
        ]
    body += _drawn(legend, bottom + 40 + under)
    return _svg(width, height, title, body)


def bars_svg(
    title: str,
    axis: str,
    labels: list[str],
    values: list[float],
    *,
    width: int,
    height: int,
    colour: str,
    unit: str = "",
) -> str:
    """One bar a label, its value written at its end (in full where it is a count), in `unit`;
    a value not known (NaN) is no bar, and says so."""
    finite = [v if math.isfinite(v) else 0.0 for v in values]
    said = [figure(v, unit, whole=True) if math.isfinite(v) else "not known" for v in values]
    left, top, bottom = 220.0, 40.0, height - 40.0
    right = width - 20.0 - 7 * max((len(s) for s in said), default=10)  # room for the longest
    low, high, ticks = scale(min(finite, default=0.0), max(finite, default=1.0))

    def x_of(v: float) -> float:  # (as y_of in line_svg)
        return left + (min(max(v, low), high) - low) / (high - low) * (right - left)

    body = [f'<text x="{(left + right) / 2:g}" y="{height - 8:g}" text-anchor="middle">{_e(axis)}</text>']
    for t in ticks:
        x = x_of(t)
        body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top:g}" y2="{bottom:g}" stroke="{GRID}"/>')
        body.append(
            f'<text x="{x:.1f}" y="{bottom + 16:g}" text-anchor="middle">{_e(figure(t, unit))}</text>'
        )
    band = (bottom - top) / max(len(labels), 1)
    for i, (label, v, text) in enumerate(zip(labels, finite, said, strict=True)):
        y, zero = top + i * band, x_of(0.0)
        x0, x1 = sorted((zero, x_of(v)))
        body.append(
            f'<rect x="{x0:.1f}" y="{y + band * 0.15:.1f}" width="{x1 - x0:.1f}" height="{band * 0.7:.1f}" '
            f'fill="{colour}"/>'
        )
        mid = y + band / 2 + 4
        body.append(f'<text x="{left - 8:g}" y="{mid:.1f}" text-anchor="end">{_e(label)}</text>')
        body.append(f'<text x="{x1 + 6:.1f}" y="{mid:.1f}">{_e(text)}</text>')
    return _svg(width, height, title, body)
