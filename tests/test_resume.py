"""Running again into the same folder: skip what is done, retry what failed, repair what a
crash tore, refuse a different job."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest

import pipeline
from pipeline.errors import SettingsError
from pipeline.output import ledger
from tests.conftest import bodies, read_jsonl, write_jsonl


async def test_a_second_run_skips_done_ids_and_retries_failed_ones(
    mock, make_settings, tmp_path: Path
) -> None:
    rows = bodies(10)
    async with mock(script=[400, 400]) as (url, server):
        first = await pipeline.run(make_settings(url, rows))
    assert first.exit_code == 1
    assert len(read_jsonl(tmp_path / "out/errors.jsonl")) == 2
    async with mock() as (url, server):
        second = await pipeline.run(make_settings(url, rows))
    assert second.exit_code == 0
    assert second.skipped == 8
    assert second.succeeded == 2
    assert len(server.state.received) == 2  # only the two that had failed
    ids = [r["custom_id"] for r in read_jsonl(tmp_path / "out/results.jsonl")]
    assert sorted(ids) == sorted(r["custom_id"] for r in rows)
    assert read_jsonl(tmp_path / "out/errors.jsonl") == []  # they succeed now: no longer listed


async def test_appended_lines_are_the_only_ones_sent(mock, make_settings, tmp_path: Path) -> None:
    async with mock() as (url, _):
        await pipeline.run(make_settings(url, bodies(5)))
    async with mock() as (url, server):
        summary = await pipeline.run(make_settings(url, bodies(8)))
    assert len(server.state.received) == 3
    assert summary.skipped == 5
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) == 8


async def test_lines_without_ids_are_recognised_on_resume(mock, make_settings, tmp_path: Path) -> None:
    rows = [{"model": "m", "messages": [{"role": "user", "content": f"q{i % 3}"}]} for i in range(6)]
    async with mock() as (url, _):
        await pipeline.run(make_settings(url, rows))
    async with mock() as (url, server):
        summary = await pipeline.run(make_settings(url, rows))
    assert server.state.received == []
    assert summary.skipped == 6
    ids = [r["custom_id"] for r in read_jsonl(tmp_path / "out/results.jsonl")]
    assert len(set(ids)) == 6  # identical lines get distinct, stable ids


async def test_a_torn_last_line_is_repaired_not_read(mock, make_settings, tmp_path: Path) -> None:
    rows = bodies(4)
    async with mock() as (url, _):
        await pipeline.run(make_settings(url, rows))
    results = tmp_path / "out/results.jsonl"
    lines = results.read_bytes().splitlines(keepends=True)
    torn_id = orjson.loads(lines[-1])["custom_id"]
    results.write_bytes(b"".join(lines[:-1]) + lines[-1][:40])  # a crash in the middle of a write
    # ...and the index never heard of that line
    from pipeline.output.ledger import Ledger

    ledger = Ledger(tmp_path / "out/ledger.sqlite")
    ledger._db.execute("DELETE FROM done WHERE id = ?", (torn_id,))
    ledger.put("results_offset", sum(len(x) for x in lines[:-1]))
    ledger.close()
    async with mock() as (url, server):
        await pipeline.run(make_settings(url, rows))
    assert [b["messages"] for b in server.state.received] == [
        r["messages"] for r in rows if r["custom_id"] == torn_id
    ]
    data = results.read_bytes()
    assert data.endswith(b"\n")
    ids = [r["custom_id"] for r in read_jsonl(results)]
    assert sorted(ids) == sorted(r["custom_id"] for r in rows)


async def test_lines_the_index_missed_are_picked_up_not_sent_again(
    mock, make_settings, tmp_path: Path
) -> None:
    """A crash after the result was written but before the index was committed."""
    rows = bodies(6)
    async with mock() as (url, _):
        await pipeline.run(make_settings(url, rows))
    from pipeline.output.ledger import Ledger

    ledger = Ledger(tmp_path / "out/ledger.sqlite")
    ledger.clear_done()
    ledger.put("results_offset", 0)
    ledger.close()
    async with mock() as (url, server):
        summary = await pipeline.run(make_settings(url, rows))
    assert server.state.received == []
    assert summary.skipped == 6
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) == 6


async def test_a_different_job_is_refused_and_fresh_moves_the_old_files_aside(
    mock, make_settings, tmp_path: Path
) -> None:
    async with mock() as (url, _):
        await pipeline.run(make_settings(url, bodies(3), model="a/model"))
        with pytest.raises(
            SettingsError, match=r"different job \(model was 'a/model', now 'b/model'\).*--fresh"
        ):
            await pipeline.run(make_settings(url, bodies(3), model="b/model"))
        other = write_jsonl(tmp_path / "other.jsonl", bodies(2))
        with pytest.raises(SettingsError, match="input was"):
            await pipeline.run(make_settings(url, input=other, model="a/model"))
        summary = await pipeline.run(make_settings(url, bodies(3), model="b/model", fresh=True))
    assert summary.succeeded == 3
    [old] = [p for p in (tmp_path / "out").iterdir() if p.name.startswith("previous-")]
    assert len(read_jsonl(old / "results.jsonl")) == 3
    assert (old / "usage.json").exists()
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) == 3


async def test_usage_and_report_cover_every_run(mock, make_settings, tmp_path: Path) -> None:
    async with mock(script=[500, 500, 500]) as (url, _):
        await pipeline.run(make_settings(url, bodies(5), max_attempts=1))
    async with mock() as (url, _):
        await pipeline.run(make_settings(url, bodies(5)))
    usage = orjson.loads((tmp_path / "out/usage.json").read_bytes())
    results = read_jsonl(tmp_path / "out/results.jsonl")
    assert len(usage["runs"]) == 2
    assert [r["succeeded"] for r in usage["runs"]] == [2, 3]
    assert usage["tokens"]["total_tokens"] == sum(
        r["response"]["body"]["usage"]["total_tokens"] for r in results
    )
    assert usage["answers_by_status"] == {"200": 5, "500": 3}
    assert usage["requests"]["succeeded"] == 5
    assert usage["requests"]["failed"] == 0
    report = (tmp_path / "out/report.md").read_text()
    assert len(re.findall(r"\n\| \d{4}-\d\d-\d\dT", report)) == 2  # one row per run


async def test_a_fixed_bad_line_is_no_longer_listed(mock, make_settings, tmp_path: Path) -> None:
    rows: list[object] = [*bodies(2), b"{broken"]
    async with mock() as (url, _):
        await pipeline.run(make_settings(url, rows))
    assert [e["line"] for e in read_jsonl(tmp_path / "out/errors.jsonl")] == [3]
    rows[2] = bodies(1, start=2)[0]
    async with mock() as (url, _):
        summary = await pipeline.run(make_settings(url, rows))
    assert summary.exit_code == 0
    assert read_jsonl(tmp_path / "out/errors.jsonl") == []


async def test_a_second_run_into_a_busy_folder_is_refused(mock, make_settings, tmp_path: Path) -> None:
    from pipeline.output.folder import lock_folder

    (tmp_path / "out").mkdir()
    async with mock() as (url, _):
        with lock_folder(tmp_path / "out"), pytest.raises(SettingsError, match="another run is writing"):
            await pipeline.run(make_settings(url, bodies(1)))


async def test_a_failure_read_again_stays_listed_when_the_run_stops_before_trying_it(
    mock, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A failure of the last run that this run read again but stopped before sending stays in
    # errors.jsonl; one whose line now holds another id is dropped. A run's first ids are
    # noted in memory (here one), the rest in SQLite, whose query at the run's end drops the
    # failures not read again: without the ids in memory joined to it, this run dropped them.
    monkeypatch.setattr(ledger, "SEEN_IN_MEMORY", 1)
    rows = bodies(4)
    async with mock(fail_rate=1.0) as (url, _):
        first = await pipeline.run(make_settings(url, rows, max_attempts=1))
    assert first.failed == 4
    rows[3]["custom_id"] = "another"
    async with mock(credits=0) as (url, _):  # the first answer is a 402: the run stops
        second = await pipeline.run(make_settings(url, rows, concurrency=1))
    assert second.exit_code == 3
    listed = [r["custom_id"] for r in read_jsonl(tmp_path / "out/errors.jsonl")]
    assert listed == ["job-0", "job-1", "job-2"]
