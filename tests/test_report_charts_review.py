"""A second reader's cases for the short-run charts (issue 24, point 2): each fails on the
change as merged (16ef31a) and says what a person reading the report would see; then the
cases of their fixes."""

from __future__ import annotations

import re

import pytest

from pipeline.account.timeline import Timeline, joined
from pipeline.report.charts import over_time
from pipeline.report.html import html_report
from tests.test_report import _doc
from tests.test_report_charts import START, _charts, _run, _texts, zone  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("zone")  # in Paris


def test_a_cost_partly_unknown_is_not_said_to_be_nothing_spent() -> None:
    """One model free (its server reported $0), one whose cost nobody knows: the page must not
    say "Nothing was spent." (the second model's spending is unknown, not zero)."""
    doc = _doc()
    free = next(iter(doc["models"].values()))
    free["cost"] = {"total": 0.0, "source": "server", "requests_not_reported": 0}
    doc["models"]["unpriced-model"] = {
        **free,
        "cost": {"total": None, "source": "not reported", "requests_not_reported": 1},
    }
    doc["cost"] = {"total": 0.0, "source": "server, not reported", "requests_not_reported": 1}
    for stretch in doc["timeline"]:
        for point in stretch["points"]:
            point["cost"] = 0.0
    page = html_report(doc)
    assert "Nothing was spent." not in page


def test_a_stall_still_going_is_drawn_at_a_checkpoint() -> None:
    """Ten busy seconds, then thirty in which nothing comes back, the run still going: the
    usage saved at this checkpoint (what `pipeline report` on a killed folder, and a report
    written mid-run, draw) shows the fall to nothing, not the busy rate held to the end."""
    now = [START]
    timeline = Timeline()
    timeline.clock = lambda: now[0]
    timeline.begin()
    timeline.sample(lambda: (3, None, None, None))
    for second in range(10):
        now[0] = START + second + 0.5
        for _ in range(20):
            timeline.started()
            timeline.answer("200")
    now[0] = START + 40.5  # a checkpoint, thirty seconds into the stall
    length, points = joined(timeline.state())
    assert (points[-1]["start"] - START) // length >= 39, "the stall's seconds are not in the saved timeline"


def test_time_labels_fall_on_round_times_when_intervals_have_grown() -> None:
    """Two hours (8 s intervals): the times written under the chart are round (12:15:00), not
    the start of whichever interval holds the round time (12:15:04)."""
    length, points = joined(_run([s * 4 + 0.5 for s in range(1800)], per_second=1, start=START + 3.3).state())
    assert length > 1
    labels = [t for t in _texts(_charts(over_time(length, points))[0]) if re.fullmatch(r"\d\d:\d\d:\d\d", t)]
    assert len(labels) >= 5
    assert all(t.endswith(":00") for t in labels[1:]), labels


def test_a_finished_run_gains_no_interval_after_its_end() -> None:
    """The stall's fill is for a run still going: a run that ended at 20 s and is saved (or
    merged, or reported) a minute later ends at 20 s, not in a minute of nothing."""
    timeline = _run([s + 0.5 for s in range(20)])
    now = [START + 80.0]
    timeline.clock = lambda: now[0]
    _, points = joined(timeline.state())
    assert len(points) == 20


def test_a_model_of_unknown_cost_is_not_drawn_as_costing_nothing() -> None:
    """Beside a model that cost $0.05, one whose cost is unknown gets no bar of "$0": its bar
    says the cost is not known."""
    doc = _doc()
    priced = next(iter(doc["models"].values()))
    priced["cost"] = {"total": 0.05, "source": "server", "requests_not_reported": 0}
    doc["models"]["unpriced-model"] = {
        **priced,
        "cost": {"total": None, "source": "not reported", "requests_not_reported": 3},
    }
    texts = _texts(next(svg for svg in _charts([html_report(doc)]) if "Cost by model" in svg))
    assert texts[texts.index("unpriced-model") + 1] == "not known"


def test_a_round_time_is_written_where_it_falls_in_an_interval() -> None:
    """8 s intervals from 12:06:40: 12:45:00 is halfway through the interval of 12:44:56; each
    round time's label sits where its time falls, not at the dot of an interval's start."""
    length, points = joined(_run([s * 4 + 0.5 for s in range(1800)], per_second=1, start=START + 3.3).state())
    svg = _charts(over_time(length, points))[0]
    placed = re.findall(r'<text x="([\d.]+)" y="[\d.]+" text-anchor="middle">(\d\d):(\d\d):(\d\d)<', svg)
    assert len(placed) >= 5
    pixels = (1000 - 30 - 80) / (len(points) - 1)  # (line_svg's plot, in pixels an interval)
    for x, h, m, s in placed[1:]:
        assert s == "00", placed  # round,
        moment = START + (int(h) - 12) * 3600 + (int(m) - 6) * 60 + int(s) - 40  # (12:06:40 is START)
        assert float(x) == pytest.approx(  # and where it falls
            80 + (moment - points[0]["start"]) / length * pixels, abs=0.1
        )
