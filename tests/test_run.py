"""A run end to end against the mock: what a user finds in the output folder."""

from __future__ import annotations

import time
from pathlib import Path

import orjson

import pipeline
from pipeline.mock.server import job_key
from tests.conftest import FAKE_KEY, bodies, read_jsonl


async def test_every_line_is_accounted_for_exactly_once(mock, make_settings, tmp_path: Path) -> None:
    rows: list[object] = [*bodies(40)]
    rows.insert(3, b"this is not json")
    rows.insert(10, b"[1, 2, 3]")
    rows.insert(20, {"custom_id": "no-messages", "model": "m"})
    rows.insert(25, b"")
    async with mock(fail_rate=0.1, seed=7) as (url, _):
        summary = await pipeline.run(make_settings(url, rows, max_attempts=10))
    results = read_jsonl(tmp_path / "out/results.jsonl")
    errors = read_jsonl(tmp_path / "out/errors.jsonl")
    ids = [r["custom_id"] for r in results]
    assert sorted(ids) == sorted(f"job-{i}" for i in range(40))
    assert len(set(ids)) == len(ids)
    assert sorted(e["line"] for e in errors) == [4, 11, 21]
    assert summary.exit_code == 1  # bad lines are failures the user must see
    assert summary.succeeded == 40
    assert summary.invalid_input == 3
    assert summary.pending == 0


async def test_a_429_then_200_succeeds_after_the_retry_after(mock, make_settings, tmp_path: Path) -> None:
    async with mock(script=[429], retry_after=1.0) as (url, server):
        started = time.monotonic()
        summary = await pipeline.run(make_settings(url, bodies(1)))
        elapsed = time.monotonic() - started
    assert summary.exit_code == 0
    assert [r["custom_id"] for r in read_jsonl(tmp_path / "out/results.jsonl")] == ["job-0"]
    assert elapsed >= 1.0
    assert server.state.statuses["429"] == 1
    assert server.state.statuses["200"] == 1
    usage = orjson.loads((tmp_path / "out/usage.json").read_bytes())
    assert usage["answers_by_status"] == {"200": 1, "429": 1}
    assert usage["retries"] == 1


async def test_a_400_is_not_retried_and_lands_in_errors(mock, make_settings, tmp_path: Path) -> None:
    async with mock(script=[400]) as (url, server):
        summary = await pipeline.run(make_settings(url, bodies(1)))
    assert len(server.state.received) == 1
    [error] = read_jsonl(tmp_path / "out/errors.jsonl")
    assert error["custom_id"] == "job-0"
    assert error["response"]["status_code"] == 400
    assert error["error"]["code"] == "http_error"
    assert "mock fault 400" in error["error"]["message"]
    assert error["attempts"] == 1
    assert summary.exit_code == 1
    assert read_jsonl(tmp_path / "out/results.jsonl") == []


async def test_unknown_parameters_reach_the_server_untouched(mock, make_settings) -> None:
    body = {
        "custom_id": "odd",
        "model": "vendor/model",
        "messages": [{"role": "user", "content": "hi", "x_part": {"deep": [1, 2.5, None]}}],
        "provider": {"order": ["a", "b"], "allow_fallbacks": False},
        "transforms": ["middle-out"],
        "my_new_param": {"nested": {"list": [True, False], "big": 12345678901234, "float": 0.1}},
        "reasoning": {"effort": "high"},
        "temperature": 0.7,
    }
    async with mock() as (url, server):
        await pipeline.run(make_settings(url, [body]))
    [received] = server.state.received
    sent = dict(body)
    del sent["custom_id"]
    assert received == sent
    assert orjson.dumps(received, option=orjson.OPT_SORT_KEYS) == orjson.dumps(
        sent, option=orjson.OPT_SORT_KEYS
    )


async def test_usage_totals_equal_the_sum_over_result_lines(mock, make_settings, tmp_path: Path) -> None:
    rows = bodies(30) + bodies(20, model="other/model", start=30)
    async with mock() as (url, _):
        await pipeline.run(make_settings(url, rows))
    results = read_jsonl(tmp_path / "out/results.jsonl")
    usage = orjson.loads((tmp_path / "out/usage.json").read_bytes())
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert usage["tokens"][key] == sum(r["response"]["body"]["usage"][key] for r in results)
    cost = sum(r["response"]["body"]["usage"]["cost"] for r in results)
    assert abs(usage["cost"]["total"] - cost) < 1e-9
    assert usage["models"]["other/model"]["requests"] == 20
    assert usage["models"]["test/model"]["requests"] == 30
    assert usage["cost"]["source"] == "server"


async def test_cost_the_server_does_not_report_is_said_so(mock, make_settings, tmp_path: Path) -> None:
    async with mock(cost=False) as (url, _):
        summary = await pipeline.run(make_settings(url, bodies(3)))
    assert summary.cost is None
    report = (tmp_path / "out/report.md").read_text()
    assert "not reported" in report
    assert "$0.0000" not in report


async def test_results_carry_metadata_and_batch_output_shape(mock, make_settings, tmp_path: Path) -> None:
    line = {
        "custom_id": "b-1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]},
        "metadata": {"asset": 17},
    }
    async with mock() as (url, server):
        await pipeline.run(make_settings(url, [line]))
    [result] = read_jsonl(tmp_path / "out/results.jsonl")
    assert result["custom_id"] == "b-1"
    assert result["error"] is None
    assert result["metadata"] == {"asset": 17}
    assert result["response"]["status_code"] == 200
    assert result["response"]["request_id"] == f"req-{job_key(server.state.received[0])}"
    assert result["response"]["body"]["object"] == "chat.completion"
    assert result["id"].startswith("batch_req_")


async def test_the_key_is_sent_as_bearer_and_written_nowhere(mock, make_settings, tmp_path: Path) -> None:
    async with mock(script=[400, 500, 200]) as (url, server):
        await pipeline.run(make_settings(url, bodies(3)))
    assert all(h["Authorization"] == f"Bearer {FAKE_KEY}" for h in server.state.headers)
    for path in (tmp_path / "out").iterdir():
        if path.is_file():
            assert FAKE_KEY.encode() not in path.read_bytes(), path.name
