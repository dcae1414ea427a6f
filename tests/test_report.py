"""report.html and the timeline behind it: a run over time, in one file that runs nothing."""

from __future__ import annotations

import base64
import html
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import anyio
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline
from pipeline.report.html import html_report
from pipeline.report.svg import NOT_XML, _e, bars_svg, escape, line_svg, scale
from tests.conftest import FAKE_KEY, bodies

CHARTS = (
    "Answers a second by kind, and the pace in force",
    "Latency percentiles and time to first token",
    "Requests in flight and started",
    "Tokens by model",
    "Cost by model",
    "Tokens by run",
    "Cost by run",
    "Answers by status (every attempt)",
    "Failures by code",
)
HOSTILE = '<script>alert(1)</script></title>"onload=alert(2) <a href="javascript:alert(3)">x</a>'


def _sums(doc: dict[str, Any]) -> dict[str, Any]:
    answers: dict[str, int] = {}
    out = {"started": 0, "tokens_in": 0, "tokens_out": 0, "cost": 0.0}
    for stretch in doc["timeline"]:
        for point in stretch["points"]:
            for k in out:
                out[k] += point[k]
            for a, n in point["answers"].items():
                answers[a] = answers.get(a, 0) + n
    return {**out, "answers": answers}


async def test_the_timeline_adds_up_to_the_totals_and_the_report_draws_it(
    mock, make_settings, tmp_path: Path
) -> None:
    rows = bodies(200)
    async with mock(rpm=1800, fail_rate=0.2, rate_429=0.02, latency=0.01) as (url, _):
        summary = await pipeline.run(make_settings(url, rows, max_attempts=2))
    assert summary.failed
    assert summary.succeeded + summary.failed == 200
    out = tmp_path / "out"
    doc = orjson.loads((out / "usage.json").read_bytes())
    sums = _sums(doc)
    assert sums["answers"] == doc["answers_by_status"]
    assert sums["started"] == doc["attempts"]
    assert sums["tokens_in"] == doc["tokens"]["prompt_tokens"]
    assert sums["tokens_out"] == doc["tokens"]["completion_tokens"]
    assert abs(sums["cost"] - doc["cost"]["total"]) < 1e-9
    paced = [p for s in doc["timeline"] for p in s["points"] if p.get("pace")]
    assert paced
    assert {p["pace_kind"] for p in paced} <= {"found", "stated", "given"}
    page = (out / "report.html").read_text()
    for title in CHARTS:
        assert f'alt="{title}"' in page, title
    assert "<script" not in page


async def test_a_resumed_run_is_a_stretch_of_its_own(mock, make_settings, tmp_path: Path) -> None:
    rows = bodies(40)
    async with mock(latency=0.0) as (url, _):
        await pipeline.run(make_settings(url, rows[:20]))
        await pipeline.run(make_settings(url, rows))
    doc = orjson.loads((tmp_path / "out" / "usage.json").read_bytes())
    assert len(doc["timeline"]) == 2
    assert _sums(doc)["answers"] == doc["answers_by_status"] == {"200": 40}


def _doc() -> dict[str, Any]:
    model = {
        "requests": 1,
        "choices": 1,
        "prompt_tokens": 5,
        "completion_tokens": 7,
        "total_tokens": 12,
        "cached_tokens": 0,
        "reasoning_tokens": 0,
        "cost": {"total": 0.01, "source": "server", "requests_not_reported": 0},
    }
    return {
        "folder": HOSTILE,
        "updated": "2026-11-29T00:00:00+00:00",
        "requests": {"succeeded": 1},
        "cost": {"total": 0.01, "source": "server"},
        "models": {HOSTILE: model},
        "answers_by_status": {"200": 1, HOSTILE: 1},
        "errors_by_code": {HOSTILE: 1},
        "error_messages": {HOSTILE: {HOSTILE: 1}},
        "verdicts": {HOSTILE: 1},
        "slowest": [[1.5, HOSTILE]],
        "runs": [{"exit": 0, "note": HOSTILE, "started": "2026-11-29T00:00:00+00:00"}],
        "timeline": [
            {
                "started": 1_795_000_000.0,
                "interval": 1.0,
                "shard": HOSTILE,
                "points": [
                    {
                        "start": 1_795_000_000.0,
                        "started": 2,
                        "answers": {"200": 1, HOSTILE: 1},
                        "tokens_in": 5,
                        "tokens_out": 7,
                        "cost": 0.01,
                        "latency_n": 1,
                        "latency_p50": 1.5,
                        "in_flight": 0,
                        "pace": 2.0,
                        "pace_kind": HOSTILE,
                    },
                    {
                        "start": 1_795_000_001.0,
                        "started": 0,
                        "answers": {},
                        "tokens_in": 0,
                        "tokens_out": 0,
                        "cost": 0.0,
                    },
                ],
            }
        ],
    }


def test_nothing_from_outside_can_run_in_the_report() -> None:
    page = html_report(_doc())
    assert "<script" not in page.lower()
    assert page.count("</title>") == 1  # the page's own
    assert '"onload=' not in page
    assert not re.search(r"(href|src)\s*=\s*[\"']?\s*javascript:", page, re.I)
    assert "&lt;script&gt;" in page  # shown, as text
    # Every chart is an image of a data: URL (which never runs or fetches), and the page's
    # policy forbids scripts and requests besides.
    assert "default-src 'none'" in page
    assert all(src.startswith("data:image/svg+xml;base64,") for src in re.findall(r'src="([^"]*)"', page))


def test_every_chart_is_whole_svg_with_outside_names_as_text_and_no_script() -> None:
    """A chart saved from the page and opened alone is an SVG document of its own: well formed,
    the names from outside written as its text, nothing to run."""
    page = html_report(_doc())
    charts = [base64.b64decode(src) for src in re.findall(r"base64,([^\"]*)", page)]
    assert len(charts) == 10  # 3 over time; tokens, cost by model and by run; statuses, codes, verdicts
    for chart in charts:
        root = ElementTree.fromstring(chart)
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        assert not [e for e in root.iter() if e.tag.endswith("script")]
    texts = {e.text for chart in charts for e in ElementTree.fromstring(chart).iter() if e.text}
    assert HOSTILE[:60] in texts  # a bar's label, as the reader wrote it


@pytest.mark.parametrize(
    ("low", "high"),
    [(0.0, 0.0), (0.05282322718449552, 0.05282322718449553), (0.0, 5e-324), (-1e300, 1e300), (3.0, 7.0)],
)
def test_a_value_axis_covers_its_values_in_a_few_round_steps(low: float, high: float) -> None:
    bottom, top, ticks = scale(low, high)
    assert bottom <= low
    assert high <= top
    assert bottom < top
    assert 3 <= len(ticks) <= 12
    assert ticks == sorted(ticks)


NAMES = st.text(max_size=12)
VALUES = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([1.7976931348623157e308, -1.7e308])


@settings(max_examples=200)
@given(
    st.lists(st.tuples(NAMES, st.lists(st.none() | VALUES, max_size=6)), max_size=3),
    st.lists(NAMES, max_size=6),
    NAMES,
)
def test_any_names_and_values_draw_a_well_formed_chart(
    series: list[tuple[str, list[float | None]]], labels: list[str], title: str
) -> None:
    """Names come from the job file and the server (a model, an error code): whatever their
    characters, each chart parses alone (a browser shows nothing of an SVG that does not)."""
    lines = line_svg(
        title,
        title,
        len(labels),
        [(i / 2, label) for i, label in enumerate(labels)],
        [(name, values, "#000000") for name, values in series],
        width=1000,
        height=320,
        dots=True,
    )
    values = [v for _, vs in series for v in vs if v is not None]
    names = [name for name, _ in series]
    bars = bars_svg(
        title,
        title,
        names,
        values[: len(names)] + [0.0] * (len(names) - len(values)),
        width=1000,
        height=160,
        colour="#000000",
    )
    for svg in (lines, bars):
        root = ElementTree.fromstring(svg.encode())
        assert not [e for e in root.iter() if not e.tag.startswith("{http://www.w3.org/2000/svg}")]
        assert not [v for e in root.iter() for v in e.attrib.values() if re.search("nan|inf", v)]


@settings(max_examples=300)
@given(st.text(st.characters(exclude_categories=())) | st.text(st.characters(max_codepoint=0x20)))
def test_text_is_escaped_as_the_standard_library_escapes_it(text: str) -> None:
    """The report's own escape (html's module costs every run 7.6 million instructions to
    import) writes what html.escape does; a chart's text, with what XML cannot carry
    replaced, whatever its characters (lone surrogates and controls among them)."""
    assert escape(text) == html.escape(text, quote=True)
    assert _e(text) == html.escape(re.sub(NOT_XML, "\ufffd", text), quote=True)
    assert (
        _e(text + "\ud800\x00\ufffe\t")
        == html.escape(re.sub(NOT_XML, "\ufffd", text), quote=True) + "\ufffd" * 3 + "\t"
    )


def test_a_long_run_writes_at_most_ten_times_under_its_charts() -> None:
    """Written side by side, more than ten times of day overlap on a chart's axis."""
    doc = _doc()
    point = doc["timeline"][0]["points"][0]
    doc["timeline"][0]["points"] = [{**point, "start": point["start"] + 10 * k} for k in range(25)]
    first = base64.b64decode(re.findall(r"base64,([^\"]*)", html_report(doc))[0]).decode()
    assert 5 <= len(re.findall(r">\d\d:\d\d:\d\d<", first)) <= 10


def test_a_run_of_two_days_writes_its_times_over_both() -> None:
    """Times of day repeat after a day: written over both days, not the first only (the
    second day's axis was left bare)."""
    doc = _doc()
    point = doc["timeline"][0]["points"][0]
    doc["timeline"][0]["points"] = [{**point, "start": point["start"] + 8640 * k} for k in range(20)]
    first = base64.b64decode(re.findall(r"base64,([^\"]*)", html_report(doc))[0]).decode()
    xs = [
        float(x)
        for x in re.findall(r'<text x="([\d.]+)" y="[\d.]+" text-anchor="middle">\d\d:\d\d:\d\d<', first)
    ]
    assert 5 <= len(xs) <= 10
    assert xs == sorted(xs)
    assert len([x for x in xs if x > 550]) >= 3  # the second day's half of the axis


def test_pipeline_report_redraws_a_folder_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    not_one = tmp_path / "nothing"
    not_one.mkdir()
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "report", str(not_one)], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "not an output folder" in done.stderr
    assert done.stderr.count("\n") == 1  # one line


async def test_pipeline_report_on_finished_and_killed_folders(mock, make_settings, tmp_path: Path) -> None:
    from tests.test_crash import start

    rows = bodies(200)
    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    async with mock(latency=0.05) as (url, _):
        killed = await start(url, src, tmp_path / "killed", "--concurrency", "4")
        results = tmp_path / "killed" / "results.jsonl"
        with anyio.fail_after(30):  # sending (a start-up on a busy machine can take a second)...
            # (another process's file: no event crosses to here)
            while not results.exists() or results.read_bytes().count(b"\n") < 10:  # noqa: ASYNC110
                await anyio.sleep(0.05)
        await anyio.sleep(1.5)  # ...and past its first checkpoint (every second): the usage as of then
        killed.kill()
        await killed.wait()
        await pipeline.run(make_settings(url, rows[:30], output=tmp_path / "finished"))
    for folder in ("killed", "finished"):
        (tmp_path / folder / "report.html").unlink(missing_ok=True)
        done = await anyio.run_process(
            [sys.executable, "-m", "pipeline", "report", str(tmp_path / folder)],
            check=False,
            env={"LUMENFALL_API_KEY": FAKE_KEY, "PATH": "/usr/bin:/bin"},
        )
        assert done.returncode == 0, done.stderr
        page = (tmp_path / folder / "report.html").read_text()
        # (lines answered within one interval, as 30 may be, or a run killed before its second
        # checkpoint on a busy machine: said in words, not drawn)
        drawn = 'alt="Answers a second by kind, and the pace in force"' in page
        assert drawn or "fits in one interval" in page
        assert (tmp_path / folder / "report.md").exists()


async def test_the_log_line_shows_the_pace_and_the_429s_of_the_last_minute(
    mock, make_settings, capsys
) -> None:
    async with mock(rpm=1800, latency=0.01) as (url, _):
        await pipeline.run(make_settings(url, bodies(150), quiet=False, progress_interval=0.5))
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pipeline: ")]
    assert any(
        re.search(r"pace [\d,]+/min \(found\), [\d,]+ 429s in the last minute", line) for line in lines
    ), lines
    assert any(re.search(r"[1-9][\d,]* 429s in the last minute", line) for line in lines), (
        lines
    )  # while finding it


async def test_a_merged_set_of_shards_joins_their_timelines_by_time(
    mock, make_settings, tmp_path: Path
) -> None:
    from pipeline.output.merge import merge
    from pipeline.report.rebuild import rebuild

    src = tmp_path / "in.jsonl"
    src.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in bodies(60)))
    out = tmp_path / "sharded"
    async with mock(latency=0.01) as (url, _):
        for k in (1, 2):
            await pipeline.run(make_settings(url, input=src, output=out, shard=f"{k}/2"))
    assert rebuild(out)["requests"]["succeeded"] == 60  # not merged yet: counted in the shards
    assert "killed?" not in (out / "shard-1-of-2" / "report.html").read_text()  # its run is found
    merge(out)
    (out / "report.html").unlink()
    doc = rebuild(out)  # what pipeline report OUT does on a merged set
    assert {s["shard"] for s in doc["timeline"]} == {"1/2", "2/2"}
    assert _sums(doc)["answers"] == doc["answers_by_status"] == {"200": 60}
    assert 'alt="Cost by run"' in (out / "report.html").read_text()


def test_intervals_joined_on_a_longer_axis_keep_their_rates() -> None:
    from pipeline.account.timeline import joined

    def point(start: float, n: int, flying: int) -> dict[str, Any]:
        return {"start": start, "answers": {"200": n}, "started": n, "seconds": 10.0, "in_flight": flying}

    first = {"started": 0.0, "interval": 10.0, "points": [point(0.0, 100, 10), point(10.0, 100, 10)]}
    resumed = {"started": 40.0, "interval": 20.0, "points": [{**point(40.0, 200, 10), "seconds": 20.0}]}
    length, points = joined([first, resumed])
    assert length == 20.0
    # One run's two 10 s intervals make one of 20 s: 10 a second, 10 in flight, not 20 and 20.
    assert [(p["answers"]["200"] / p["seconds"], p["in_flight"]) for p in points] == [(10.0, 10), (10.0, 10)]
    shards = joined([first, {**first, "shard": "2/2"}])[1]
    assert [(p["answers"]["200"] / p["seconds"], p["in_flight"]) for p in shards] == [(20.0, 20), (20.0, 20)]


def test_latencies_that_differ_by_float_noise_are_drawn() -> None:
    """pygal's scale never ended on a range of float noise (shards' p50s of
    0.05282322718449553 and ...552, averaged by count): merge hung drawing it. Drawn in a
    process of its own, so that a hang fails."""
    code = (
        "from tests.test_report import _doc\n"
        "from pipeline.report.html import html_report\n"
        "doc = _doc()\n"
        "p = doc['timeline'][0]['points'][0]\n"
        "p['latency_p50'] = 0.05282322718449553\n"
        "doc['timeline'][0]['points'] = [p, {**p, 'start': p['start'] + 10, 'latency_p50': 0.05282322718449552}]\n"
        "assert 'Latency percentiles' in html_report(doc)\n"
    )
    root = Path(__file__).resolve().parents[1]  # where `tests` imports from, whatever the cwd
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_report_draws_the_slowest_few_models_paces_and_counts_the_rest() -> None:
    doc = _doc()
    point = doc["timeline"][0]["points"][0]
    point["scopes"] = {f"v/m{i}:free": {"pace": 1.0 + i, "pace_kind": "found"} for i in range(40)}
    page = html_report(doc)
    charts = "".join(base64.b64decode(src).decode() for src in re.findall(r"base64,([^\"]*)", page))
    assert set(re.findall(r"pace for (v/m\d+:free)", charts)) == {f"v/m{i}:free" for i in range(4)}
    assert "36 more models paced" in charts
