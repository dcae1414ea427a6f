"""What a person reads on the report's charts: a short run drawn in as many points as it had
seconds, values rounded with their units, times in local time with the zone named, and words
where a chart would be an empty frame. In-process: a timeline on a fake clock, drawn."""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Iterator
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.account.timeline import Timeline, joined
from pipeline.account.usage import Usage
from pipeline.report.charts import over_time
from pipeline.report.figures import rounded
from pipeline.report.html import html_report
from pipeline.report.svg import scale
from tests.test_report import _doc

START = 1_795_000_000.0  # 2026-11-18 11:06:40 UTC
# POSIX zone strings: the same on every machine, with or without a zone database.
PARIS = "CET-1CEST,M3.5.0,M10.5.0/3"
NEW_YORK = "EST5EDT,M3.2.0,M11.1.0"


@pytest.fixture
def zone(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    def set_zone(name: str) -> None:
        monkeypatch.setenv("TZ", name)
        time.tzset()

    set_zone(PARIS)
    yield set_zone
    monkeypatch.undo()
    time.tzset()


def _run(
    seconds: list[float], *, per_second: int = 95, cost: float = 0.000312, start: float = START
) -> Timeline:
    """A run on a fake clock from `start`: `per_second` requests answered at each of `seconds`
    after it, with a pace found of 95.238... a second."""
    now = [start]
    timeline = Timeline()
    timeline.clock = lambda: now[0]
    timeline.begin()
    timeline.sample(lambda: (3, 95.23809523809524, "found", None))
    for second in seconds:
        now[0] = start + second
        for _ in range(per_second):
            timeline.started()
            timeline.answer("200")
        timeline.kept(120 * per_second, 80 * per_second, [cost] * per_second, [90] * per_second, [])
    timeline.finish()
    return timeline


def _charts(parts: list[str]) -> list[str]:
    return [base64.b64decode(src).decode() for part in parts for src in re.findall(r"base64,([^\"]*)", part)]


def _texts(svg: str) -> list[str]:
    return re.findall(r">([^<]+)</text>", svg)


def _drawn(svg: str, colour: str = "#33aa77") -> list[str]:
    """The points of the line drawn in `colour` (success's, unless told)."""
    lines = re.findall(rf'<polyline points="([^"]*)" fill="none" stroke="{colour}"', svg)
    return [xy for line in lines for xy in line.split()]


def test_a_run_of_20_seconds_is_drawn_in_20_points(zone: Callable[[str], None]) -> None:
    length, points = joined(_run([s + 0.5 for s in range(20)]).state())
    answers = _charts(over_time(length, points))[0]
    assert len(_drawn(answers)) == 20  # one dot a second, not one for the whole run


def test_a_stall_is_drawn_as_a_fall_to_nothing(zone: Callable[[str], None]) -> None:
    """Seconds in which nothing came back are points at zero, not closed up: the chart would
    join second 4 to second 15 as though no stall had been."""
    length, points = joined(_run([s + 0.5 for s in (*range(5), *range(15, 20))]).state())
    answers = _charts(over_time(length, points))[0]
    drawn = _drawn(answers)
    assert len(drawn) == 20
    heights = [float(xy.split(",")[1]) for xy in drawn]
    assert len({round(h) for h in heights[5:15]}) == 1  # at zero, all ten
    assert min(heights[5:15]) > max(heights[:5])  # (lower on the chart: a larger y)


def _significant(text: str) -> int:
    """Significant figures of a written figure (of "100", one; of "0.0312", three)."""
    number = text.split("×")[0]
    digits = re.sub(r"\D", "", number).lstrip("0")
    return len(digits) if "." in number else len(digits.rstrip("0"))


def test_axis_values_are_rounded_to_three_figures_with_their_units(zone: Callable[[str], None]) -> None:
    doc = _doc()
    doc["models"] = {
        name: {**m, "total_tokens": 12_345, "cost": {**m["cost"], "total": 0.0312345}}
        for name, m in doc["models"].items()
    }
    doc["timeline"] = _run([s + 0.5 for s in range(20)], per_second=21, cost=0.00012345).state()
    charts = _charts([html_report(doc)])
    texts = [t for svg in charts for t in _texts(svg)]
    values = [t for t in texts if re.fullmatch(r"[-$\d.,kMBT×⁰¹²³⁴⁵⁶⁷⁸⁹⁻ ]+(/s|s|tokens)?", t.strip())]
    assert values
    assert not [t for t in values if "," not in t and _significant(t) > 3], values  # no 95.23809524
    answers = _texts(charts[0])
    assert "0 /s" in answers  # the answers' axis, a second
    assert any(re.fullmatch(r"\d+ /s", t) for t in answers if t != "0 /s")
    latency = _texts(charts[1])
    assert any(re.fullmatch(r"0\.\d+ s", t) for t in latency)
    tokens = next(svg for svg in charts if "Tokens by model" in svg)
    assert "12,345 tokens" in _texts(tokens)  # the bar's own figure, in full
    assert "10k tokens" in _texts(tokens)  # the axis, at a round value
    cost = next(svg for svg in charts if "Cost by model" in svg)
    assert "$0.0312" in _texts(cost)
    assert "$0.01" in _texts(cost)


def test_times_are_local_and_the_zone_is_named(zone: Callable[[str], None]) -> None:
    doc = _doc()
    doc["timeline"] = _run([s + 0.5 for s in range(20)]).state()
    for name, first, named in (
        (PARIS, "12:06:40", "CET, UTC+01:00"),
        (NEW_YORK, "06:06:40", "EST, UTC-05:00"),
    ):
        zone(name)
        page = html_report(doc)
        answers = _texts(_charts([page])[0])
        assert first in answers  # 11:06:40 UTC, on the clock where the report is read
        assert f"local time ({named})" in answers
        assert f"2026-11-18 {first} {named.split(',')[0]}" in page  # the run's bar and row


def test_time_labels_fall_on_round_times(zone: Callable[[str], None]) -> None:
    """Five minutes from 12:06:43.3: the first second's time, then times at round seconds (not
    12:07:13, 12:07:43..., every thirtieth)."""
    length, points = joined(_run([s + 0.5 for s in range(300)], per_second=1, start=START + 3.3).state())
    labels = [t for t in _texts(_charts(over_time(length, points))[0]) if re.fullmatch(r"\d\d:\d\d:\d\d", t)]
    assert 5 <= len(labels) <= 10
    assert labels[0] == "12:06:43"
    assert all(int(t[-2:]) % 15 == 0 for t in labels[1:]), labels  # (on a step of 15 s)


def test_a_chart_with_nothing_to_show_says_so_in_words(zone: Callable[[str], None]) -> None:
    doc = _doc()
    doc["retries"] = 0
    doc["timeline"] = _run([s + 0.5 for s in range(20)], cost=0.0).state()
    for m in doc["models"].values():
        m["cost"]["total"] = 0.0
    page = html_report(doc)
    assert "No 429s, no 5xx answers, no errors and no retries in this run." in page
    assert "Nothing was spent." in page
    assert 'alt="Cost by model"' not in page  # no empty frame
    assert 'alt="Cost by run"' not in page
    for m in doc["models"].values():
        m["cost"]["total"] = None
    assert "No cost is known" in html_report(doc)
    doc["timeline"] = _run([0.5]).state()  # under a second: one interval
    page = html_report(doc)
    assert "The run fits in one interval (0.5 s, 95 answers): nothing to draw over time." in page
    assert 'alt="Answers a second by kind, and the pace in force"' not in page


def test_shards_of_different_interval_widths_join_on_the_widest(zone: Callable[[str], None]) -> None:
    """A shard of 20 s (1 s intervals) and one of 25 minutes (2 s: it kept a thousand) merge,
    through the ledger's form of their usage, on 2 s intervals that add up to both."""
    shards = []
    for seconds in ([s + 0.5 for s in range(20)], [s + 0.5 for s in range(1500)]):
        usage = Usage()
        usage.timeline = _run(seconds, per_second=2)
        shards.append(Usage.from_state(usage.state()))
    merged = Usage()
    for k, shard in enumerate(shards, 1):
        merged.add(shard, label=f"{k}/2")
    stretches = Usage.from_state(merged.state()).timeline.state()
    assert [s["interval"] for s in stretches] == [1.0, 2.0]
    length, points = joined(stretches)
    assert length == 2.0
    assert sum(p["answers"]["200"] for p in points) == 2 * (20 + 1500)
    assert len(points) == 750  # the short shard's 20 s fall within the long one's first 10 intervals
    # The 20 s shard's ten intervals: both shards' answers, each over its own 2 s (4 a second).
    assert {p["answers"]["200"] / p["seconds"] for p in points[:10]} == {4.0}


def _value(text: str) -> Decimal:
    """A rounded figure read back."""
    if "×10" in text:
        mantissa, power = text.split("×10")
        exponent = int(power.translate(str.maketrans("⁻⁰¹²³⁴⁵⁶⁷⁸⁹", "-0123456789")))
        return Decimal(mantissa) * Decimal(10) ** exponent
    scale_by = {"k": 3, "M": 6, "B": 9, "T": 12}
    if text[-1] in scale_by:
        return Decimal(text[:-1]) * Decimal(10) ** scale_by[text[-1]]
    return Decimal(text)


FINITE = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=150)
@given(FINITE, FINITE)
def test_any_value_is_written_in_three_figures_and_read_back(a: float, b: float) -> None:
    """Any float: at most three significant figures, no exponent Python would write (`e+15`),
    within half a percent of the value, and in the same order as the values."""
    for value in (a, b):
        text = rounded(value)
        assert re.fullmatch(r"-?\d+(\.\d+)?([kMBT]|×10⁻?[⁰¹²³⁴⁵⁶⁷⁸⁹]+)?", text), text
        assert _significant(text) <= 3, text
        read = _value(text)
        assert abs(read - Decimal(value)) <= abs(Decimal(value)) * Decimal("0.005"), (value, text)
    if a <= b:
        assert _value(rounded(a)) <= _value(rounded(b))


@settings(max_examples=150)
@given(FINITE, FINITE)
def test_a_value_axis_is_written_in_rising_round_values(a: float, b: float) -> None:
    _, _, ticks = scale(min(a, b), max(a, b))
    written = [_value(rounded(t)) for t in ticks]
    assert written == sorted(set(written))  # rising, none written twice
    assert all(_significant(rounded(t)) <= 2 for t in ticks)  # 1, 2 or 5 steps: round values
