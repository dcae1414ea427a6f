"""A hostile server: faults of every kind, keys refused, credits gone."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import orjson

import pipeline
from tests.conftest import bodies, read_jsonl


async def test_the_fault_mix_loses_nothing_and_doubles_nothing(mock, make_settings, tmp_path: Path) -> None:
    n = 3000
    rows = bodies(n)
    faults = {
        "fail_rate": 0.05,
        "rate_429": 0.02,
        "retry_after": 0.2,
        "drop_rate": 0.01,
        "malformed_rate": 0.01,
        "error_200_rate": 0.01,
        "seed": 3,
        "record": False,
    }
    async with mock(**faults) as (url, server):
        summary = await pipeline.run(make_settings(url, rows, concurrency=64, max_attempts=12))
    results = read_jsonl(tmp_path / "out/results.jsonl")
    ids = Counter(r["custom_id"] for r in results)
    assert summary.exit_code == 0
    assert len(ids) == n  # nothing lost
    assert max(ids.values()) == 1  # nothing doubled
    assert read_jsonl(tmp_path / "out/errors.jsonl") == []
    stats = server.state.stats()
    assert stats["answered_twice"] == 0  # no job was answered (and billed) twice...
    assert sum(server.state.answered.values()) == n + stats["lost_answers"]  # ...but for lost answers
    # every fault happened, and every one was retried
    for key in ("500", "429", "drop", "malformed", "error200"):
        assert server.state.statuses[key] > 0, key
    usage = orjson.loads((tmp_path / "out/usage.json").read_bytes())
    assert usage["retries"] == usage["attempts"] - n
    assert all(r["response"]["body"]["object"] == "chat.completion" for r in results)


async def test_errors_dressed_as_success_are_retried_never_written(
    mock, make_settings, tmp_path: Path
) -> None:
    rows = bodies(20) + [
        {
            "custom_id": f"s-{i}",
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": f"s{i}"}],
        }
        for i in range(20)
    ]
    async with mock(error_200_rate=0.25, malformed_rate=0.25, cut_stream_rate=0.25, seed=5) as (url, _):
        summary = await pipeline.run(make_settings(url, rows, max_attempts=20))
    assert summary.exit_code == 0
    results = read_jsonl(tmp_path / "out/results.jsonl")
    assert len(results) == 40
    for r in results:
        body = r["response"]["body"]
        assert "error" not in body
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["total_tokens"] > 0
    answers = orjson.loads((tmp_path / "out/usage.json").read_bytes())["answers_by_status"]
    assert answers["provider_error"] > 0
    assert answers["malformed_response"] > 0


async def test_a_refused_key_stops_the_run_at_once_and_it_resumes(
    mock, make_settings, tmp_path: Path
) -> None:
    rows = bodies(200)
    async with mock(api_key="the-right-key") as (url, server):
        summary = await pipeline.run(make_settings(url, rows, concurrency=4))
    assert summary.exit_code == 3
    assert "refused the API key" in summary.message
    assert "run the same command again" in summary.message
    assert len(server.state.received) <= 8  # not every job sent through its retries
    assert read_jsonl(tmp_path / "out/errors.jsonl") == []  # not the jobs' fault: still to do
    assert summary.pending == 200
    async with mock() as (url, _):
        summary = await pipeline.run(make_settings(url, rows))
    assert summary.exit_code == 0
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) == 200


async def test_exhausted_credits_stop_the_run_and_it_resumes(mock, make_settings, tmp_path: Path) -> None:
    rows = bodies(100)
    async with mock(credits=30) as (url, _):
        summary = await pipeline.run(make_settings(url, rows, concurrency=4))
    assert summary.exit_code == 3
    assert "out of credits" in summary.message
    done = len(read_jsonl(tmp_path / "out/results.jsonl"))
    assert done == 30
    assert summary.pending == 70
    async with mock() as (url, server):
        summary = await pipeline.run(make_settings(url, rows))
    assert summary.exit_code == 0
    assert len(server.state.received) == 70
    ids = [r["custom_id"] for r in read_jsonl(tmp_path / "out/results.jsonl")]
    assert sorted(ids) == sorted(r["custom_id"] for r in rows)


async def test_a_daily_quota_spent_stops_the_run_with_when_to_resume(
    mock, make_settings, tmp_path: Path
) -> None:
    rows = bodies(100)
    # The quota resets at midnight UTC: within the two minutes before it, the run would wait
    # for it rather than stop. The mock's clock says noon, whenever the test runs.
    noon, since = time.time() // 86_400 * 86_400 + 43_200, time.time()
    async with mock(quota=30, latency=0.01, clock=lambda: noon + time.time() - since) as (url, _):
        began = time.monotonic()
        summary = await pipeline.run(make_settings(url, rows, concurrency=4, max_attempts=2))
        took = time.monotonic() - began
    assert summary.exit_code == 3
    assert "quota" in summary.message
    assert "UTC" in summary.message  # when to come back
    assert "run the same command again" in summary.message
    assert took < 5  # at once, not request by request
    assert summary.failed == 0  # a 429 is "later": nobody's fault, all still to do
    assert summary.pending == 70
    assert read_jsonl(tmp_path / "out/errors.jsonl") == []


async def test_a_429_for_an_account_without_credit_stops_the_run(mock, make_settings, tmp_path: Path) -> None:
    async with mock(script=["no_quota"] * 20) as (url, _):
        summary = await pipeline.run(make_settings(url, bodies(20), concurrency=1))
    assert summary.exit_code == 3
    assert "out of credits" in summary.message
    assert summary.pending == 20


async def test_a_streak_of_403s_stops_the_run_but_a_lone_one_does_not(
    mock, make_settings, tmp_path: Path
) -> None:
    async with mock(script=[403, 200, 403, 200]) as (url, _):
        summary = await pipeline.run(make_settings(url, bodies(10), concurrency=1))
    assert summary.exit_code == 1  # two jobs refused, the run went on
    assert len(read_jsonl(tmp_path / "out/errors.jsonl")) == 2
    async with mock(script=[403] * 50) as (url, _):
        summary = await pipeline.run(
            make_settings(url, bodies(50, start=100), output=tmp_path / "o2", concurrency=1)
        )
    assert summary.exit_code == 3
    assert "refused the API key" in summary.message
