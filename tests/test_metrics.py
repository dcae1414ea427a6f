"""`--metrics-port`: what a cluster's Prometheus scrapes while a run goes."""

from __future__ import annotations

import contextlib
import socket
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import anyio
import pytest
from hypothesis import given
from hypothesis import settings as examples
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

import pipeline
from pipeline.account.histogram import Histogram
from pipeline.account.usage import Usage
from pipeline.errors import SettingsError
from pipeline.run.metrics import RunCollector, _buckets
from pipeline.settings import build
from tests.conftest import FAKE_KEY, bodies

Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _scrape(port: int) -> tuple[str, Scrape, dict[str, str]]:
    """The page, its samples by name and labels, and each family's type."""
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/metrics") as got:
        assert got.status == 200
        text = await got.text()
    samples: Scrape = {}
    types = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return text, samples, types


def _succeeded(scrape: Scrape) -> float:
    return scrape.get(("pipeline_results_total", (("outcome", "succeeded"),)), 0.0)


async def test_a_scrape_mid_run_shows_the_run_moving(mock, make_settings, tmp_path: Path) -> None:
    port = _free_port()
    job = tmp_path / "job.toml"
    job.write_text(f"metrics_port = {port}\n")  # (the job file's key)
    rows: list[dict[str, Any]] = bodies(100)
    for row in rows[::2]:
        row["stream"] = True
    summaries: list[pipeline.Summary] = []
    scrapes: list[tuple[str, Scrape, dict[str, str]]] = []
    async with mock(latency=0.02, fail_rate=0.05, seed=3) as (url, _), anyio.create_task_group() as tg:
        settings = make_settings(url, rows, job=job, concurrency=4, rpm=30000)

        async def go() -> None:
            summaries.append(await pipeline.run(settings))

        tg.start_soon(go)
        for at_least in (5, 40):  # (a scrape is what tells: looked at every 10 ms, as `until` does)
            while True:
                assert not summaries, "the run ended before it was scraped"
                with contextlib.suppress(aiohttp.ClientConnectionError):  # (not serving yet)
                    scrape = await _scrape(port)
                    if _succeeded(scrape[1]) >= at_least:
                        scrapes.append(scrape)
                        break
                await anyio.sleep(0.01)
    [summary] = summaries
    assert summary.exit_code == 0
    (_, first, _), (text, last, types) = scrapes
    lines = 100
    assert _succeeded(last) > _succeeded(first) >= 5
    # Counters named as Prometheus names them, moving; the gauges and histograms beside them.
    for name, kind in {
        "pipeline_requests": "counter",
        "pipeline_results": "counter",
        "pipeline_answers": "counter",
        "pipeline_tokens": "counter",
        "pipeline_cost_usd": "counter",
        "pipeline_retries": "counter",
        "pipeline_requests_in_flight": "gauge",
        "pipeline_pace_requests_per_second": "gauge",
        "pipeline_limit_requests_per_second": "gauge",
        "pipeline_request_duration_seconds": "histogram",
        "pipeline_time_to_first_token_seconds": "histogram",
        "pipeline_lines_done": "gauge",
        "pipeline_lines_pending": "gauge",
    }.items():
        assert types.get(name) == kind, name
    assert all(name.startswith(("pipeline_", "process_")) for name in types)
    for key in (
        ("pipeline_requests_total", (("status", "200"),)),
        ("pipeline_answers_total", ()),
        ("pipeline_tokens_total", (("direction", "in"),)),
        ("pipeline_tokens_total", (("direction", "out"),)),
        ("pipeline_cost_usd_total", ()),
        ("pipeline_lines_done", ()),
    ):
        assert last[key] > first[key] > 0, key
    assert last["pipeline_lines_pending", ()] == lines - last["pipeline_lines_done", ()]
    assert 0 <= last["pipeline_requests_in_flight", ()] <= 4
    assert last["pipeline_limit_requests_per_second", (("model", ""), ("scope", "account"))] == pytest.approx(
        500
    )
    assert 0 < last["pipeline_pace_requests_per_second", (("model", ""), ("scope", "account"))] <= 500
    # Every result's latency is in the histogram, read at the same moment; the streamed ones' first token.
    assert last["pipeline_request_duration_seconds_count", ()] == _succeeded(last)
    assert last["pipeline_request_duration_seconds_bucket", (("le", "+Inf"),)] == _succeeded(last)
    assert 0 < last["pipeline_time_to_first_token_seconds_count", ()] < _succeeded(last)
    bounds = [
        le
        for (name, labels), _ in last.items()
        if name.endswith("duration_seconds_bucket")
        for _, le in labels
    ]
    assert bounds[0] == "0.1"
    assert "120.0" in bounds
    assert FAKE_KEY not in text  # (nor the endpoint)
    assert url not in text
    assert "127.0.0.1" not in text


async def test_a_port_in_use_is_said_in_one_line_before_anything_is_sent(
    mock, make_settings, tmp_path: Path
) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with mock() as (url, server):
            with pytest.raises(SettingsError) as raised:
                await pipeline.run(make_settings(url, bodies(3), metrics_port=port))
    message = str(raised.value)
    assert f"--metrics-port {port}: the port is in use" in message
    assert "\n" not in message
    assert server.state.received == []
    assert not (tmp_path / "out").exists()


async def test_prometheus_client_is_imported_only_for_the_flag(
    mock, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    async with mock() as (url, server):
        assert (await pipeline.run(make_settings(url, bodies(3)))).exit_code == 0
        with pytest.raises(SettingsError, match=r"pip install 'chat-pipeline\[metrics\]'"):
            await pipeline.run(
                make_settings(url, bodies(3), output=tmp_path / "b", metrics_port=_free_port())
            )
    assert len(server.state.received) == 3


@pytest.mark.parametrize(
    ("line", "said"),
    [
        ("metrics_port = 0", "metrics_port must be a whole number above 0"),
        ("metrics_port = 70000", "metrics_port must be a port, 1 to 65535"),
        ('metrics_port = "9100"', "'metrics_port' must be int"),
    ],
)
def test_a_wrong_metrics_port_in_the_job_file_names_it(tmp_path: Path, line: str, said: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(line + "\n")
    with pytest.raises(SettingsError, match=said) as raised:
        build(job, input="in.jsonl", output="out")
    assert str(job) in str(raised.value)


def test_metrics_host_alone_is_refused() -> None:
    with pytest.raises(SettingsError, match="give --metrics-port too"):
        build(input="in.jsonl", metrics_host="127.0.0.1")


def _fake_run(usage: Usage) -> Any:
    unpaced = SimpleNamespace(pacer=SimpleNamespace(request_rate=None))
    return SimpleNamespace(
        usage=usage,
        control=SimpleNamespace(in_flight=0),
        finder=unpaced,
        gate=SimpleNamespace(scopes=SimpleNamespace(paces=dict)),
        progress=SimpleNamespace(done=lambda: 7),
        counts=SimpleNamespace(total=None, elsewhere=0),
    )


def test_a_resumed_folder_counts_from_0_what_this_run_does() -> None:
    usage = Usage()  # what the folder's earlier runs counted
    usage.add_body({"model": "m", "usage": {"prompt_tokens": 100, "completion_tokens": 10, "cost": 1.0}})
    usage.answer("200", 5)
    usage.latency.add(3.0)
    collector = RunCollector(_fake_run(usage))
    usage.add_body({"model": "m", "usage": {"prompt_tokens": 7, "completion_tokens": 2, "cost": 0.25}})
    usage.answer("429")
    usage.latency.add(0.2)
    samples = {
        (sample.name, tuple(sample.labels.values())): sample.value
        for family in collector.collect()
        for sample in family.samples
    }
    assert samples["pipeline_requests_total", ("200",)] == 0
    assert samples["pipeline_requests_total", ("429",)] == 1
    assert samples["pipeline_tokens_total", ("in",)] == 7
    assert samples["pipeline_cost_usd_total", ()] == 0.25
    assert samples["pipeline_request_duration_seconds_bucket", ("0.25",)] == 1
    assert samples["pipeline_request_duration_seconds_count", ()] == 1
    assert samples["pipeline_lines_done", ()] == 7  # (the folder's: done before counts)
    assert ("pipeline_lines_pending", ()) not in samples  # (the input not yet counted)
    assert not [key for key in samples if key[0].startswith("pipeline_pace")]  # (unpaced)


@examples(max_examples=100)  # (the profile's 500 took 2.4 s: the suite is near its bound)
@given(st.lists(st.floats(min_value=0.0, max_value=1000.0), max_size=50))
def test_the_histograms_buckets_are_within_5_percent_of_the_latencies(latencies: list[float]) -> None:
    histogram = Histogram()
    for latency in latencies:
        histogram.add(latency)
    buckets, total = _buckets(histogram, {})
    assert buckets[-1] == ("+Inf", len(latencies))
    for le, n in buckets[:-1]:
        bound = float(le)
        assert sum(x <= bound * 0.95 for x in latencies) <= n <= sum(x <= bound * 1.05 for x in latencies)
    assert total == pytest.approx(sum(latencies), rel=0.03, abs=1e-3)
