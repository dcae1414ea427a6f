"""`--redo WHAT` (issue 23, point 1): the lines of a folder that need it sent again, the
request defaults free to change for them; the newer answer in results.jsonl (one line per
id), the older in superseded.jsonl, usage counting both."""

from __future__ import annotations

import asyncio
import io
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline
from pipeline.cli import main
from pipeline.errors import SettingsError
from pipeline.estimate import estimate, print_estimate
from pipeline.output.redo import parse_redo, read_ids
from pipeline.report.rebuild import rebuild
from tests.conftest import FAKE_KEY, bodies, read_jsonl, until
from tests.scripted import json, scripted

PRICES = {"test/model": {"prompt": 1.0, "completion": 2.0}}
SHORT, LONG = {"max_tokens": 20}, {"max_tokens": 60}


@pytest.fixture
def make_settings(make_settings: Any, tmp_path: Path) -> Any:
    """The conftest's, the input of the first run kept for the runs after it."""

    def make(url: str, rows: Any = None, **overrides: Any) -> Any:
        if rows is None:
            overrides.setdefault("input", tmp_path / "input.jsonl")
        return make_settings(url, rows, **overrides)

    return make


def _cut(result: dict[str, Any]) -> bool:
    return any(c["finish_reason"] == "length" for c in result["response"]["body"]["choices"])


def _usage(folder: Path) -> dict[str, Any]:
    return orjson.loads((folder / "usage.json").read_bytes())


async def _first(url: str, make_settings: Any, n: int = 30) -> tuple[list[dict[str, Any]], set[str]]:
    summary = await pipeline.run(make_settings(url, bodies(n), request=SHORT, prices=PRICES))
    assert summary.exit_code == 0
    results = read_jsonl(make_settings(url).folder / "results.jsonl")
    return results, {r["custom_id"] for r in results if _cut(r)}


async def test_a_redo_of_the_answers_cut_short_sends_only_those_and_keeps_the_old_ones_aside(
    mock, make_settings, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    async with mock() as (url, server):
        first, cut = await _first(url, make_settings)
        assert 0 < len(cut) < len(first)
        paid_first = _usage(out)["cost"]["total"]
        with pytest.raises(SettingsError, match="--redo WHAT"):  # a changed job, refused, naming the way
            await pipeline.run(make_settings(url, request=LONG, prices=PRICES))
        before = len(server.state.received)
        summary = await pipeline.run(make_settings(url, request=LONG, prices=PRICES, redo="length"))
        sent = server.state.received[before:]
    assert summary.exit_code == 0
    assert sorted(r["messages"][0]["content"] for r in sent) == sorted(
        f"question {c.removeprefix('job-')}" for c in cut
    )
    assert all(r["max_tokens"] == 60 for r in sent)
    results = read_jsonl(out / "results.jsonl")
    assert Counter(r["custom_id"] for r in results) == Counter(r["custom_id"] for r in first)  # one each
    assert not any(_cut(r) for r in results)
    old = {r["custom_id"]: r for r in first}
    superseded = read_jsonl(out / "superseded.jsonl")
    assert sorted(r["custom_id"] for r in superseded) == sorted(cut)
    assert all(r == old[r["custom_id"]] for r in superseded)  # as they stood
    usage = _usage(out)
    assert usage["models"]["test/model"]["requests"] == len(first) + len(cut)  # both counted
    assert usage["cost"]["total"] > paid_first
    assert usage["requests"]["succeeded"] == len(first)
    assert usage["outcomes"]["succeeded"] == len(first)
    redo = usage["redo"]
    assert redo["lines"] == len(cut)
    assert redo["reasons"] == {"length": len(cut)}
    assert redo["superseded_cost"] > 0
    assert redo["runs"][0]["changes"] == ["request.max_tokens was 20, now 60"]
    assert "## Redone" in (out / "report.md").read_text()
    # The job recorded is the new one: a plain run goes on with it, and sends nothing.
    async with mock() as (url, server):
        again = await pipeline.run(make_settings(url, request=LONG, prices=PRICES))
        assert server.state.received == []
    assert again.exit_code == 0
    assert again.skipped == len(first)


async def test_a_redo_with_nothing_to_redo_says_so_and_sends_nothing(
    mock, make_settings, capsys: pytest.CaptureFixture[str]
) -> None:
    async with mock() as (url, server):
        await pipeline.run(make_settings(url, bodies(5), request=LONG))
        before = len(server.state.received)
        summary = await pipeline.run(make_settings(url, request=LONG, redo="length,filter"))
        assert len(server.state.received) == before
    assert summary.exit_code == 0
    assert summary.skipped == 5
    assert "nothing to redo" in capsys.readouterr().err


async def test_ids_from_a_file_go_again_and_unknown_ids_are_named_in_a_warning(
    mock, make_settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text('job-1\n\n{"custom_id": "job-3", "x": 1}\nnope-1\nnope-2\nnope-3\nnope-4\n')
    async with mock() as (url, server):
        await pipeline.run(make_settings(url, bodies(5)))
        before = len(server.state.received)
        summary = await pipeline.run(make_settings(url, redo=f"ids:{ids}"))
        assert len(server.state.received) - before == 2
    assert summary.exit_code == 0
    err = capsys.readouterr().err
    assert "4 id(s) are in no result or failure of this folder (nope-1, nope-2, nope-3, ...)" in err
    assert sorted(r["custom_id"] for r in read_jsonl(tmp_path / "out/superseded.jsonl")) == ["job-1", "job-3"]
    assert _usage(tmp_path / "out")["redo"]["runs"][0]["unknown_ids"] == 4


@pytest.mark.parametrize(
    ("what", "said"),
    [
        (
            "lenght",
            "--redo 'lenght': 'lenght' is not one of length, filter, invalid, failed, ids:FILE (did you mean length?)",
        ),
        ("", "'' is not one of"),
        ("ids:", "ids:FILE needs a file"),
        ("ids:/no/such/file", "cannot read it"),
    ],
)
def test_a_bad_what_is_a_one_line_error(what: str, said: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SettingsError, match=re.escape(said)):
        parse_redo(what)
    code = main(["run", "--input", str(tmp_path / "in.jsonl"), "--output", str(tmp_path), "--redo", what])
    err = capsys.readouterr().err
    assert code == 2
    assert said in err
    assert len(err.strip().splitlines()) == 1


def test_a_malformed_ids_file_is_refused_naming_its_line(tmp_path: Path) -> None:
    bad = tmp_path / "ids.txt"
    bad.write_bytes(b"job-1\n\xff\xfe\n")
    with pytest.raises(SettingsError, match=r"ids.txt:2: not UTF-8"):
        parse_redo(f"ids:{bad}")
    bad.write_bytes(b'job-1\n{"id": 3}\n')
    with pytest.raises(SettingsError, match=r"ids.txt:2: a JSON line without a custom_id"):
        parse_redo(f"ids:{bad}")


def test_a_job_file_cannot_keep_a_redo(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\nredo = "length"\n')
    code = main(["run", str(job)])
    assert code == 2


async def test_a_redo_cannot_change_the_input(mock, make_settings, tmp_path: Path) -> None:
    async with mock() as (url, _):
        await pipeline.run(make_settings(url, bodies(3)))
        other = tmp_path / "other.jsonl"
        other.write_bytes((tmp_path / "input.jsonl").read_bytes())
        with pytest.raises(SettingsError, match="another input"):
            await pipeline.run(make_settings(url, input=other, redo="length"))


async def test_estimate_redo_counts_the_lines_that_would_go_again(
    mock, make_settings, tmp_path: Path
) -> None:
    async with mock() as (url, server):
        first, cut = await _first(url, make_settings)
        before = len(server.state.received)
        result = estimate(make_settings(url, request=LONG, prices=PRICES, redo="length"))
        assert len(server.state.received) == before
    assert result.requests == len(cut)
    assert result.counts.skipped == len(first) - len(cut)
    out = io.StringIO()
    print_estimate(result, out=out, err=io.StringIO())
    assert f"--redo length: {len(cut)} line(s) would go again (length {len(cut)})" in out.getvalue()
    # read only: the folder is as the first run left it
    assert not (tmp_path / "out/superseded.jsonl").exists()
    assert read_jsonl(tmp_path / "out/results.jsonl") == first


async def test_a_redo_that_fails_keeps_the_old_answer_and_a_later_run_tries_again(
    mock, make_settings, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    async with mock() as (url, _):
        first, cut = await _first(url, make_settings, n=12)

    async def refuse(request: web.Request) -> web.Response:  # a final failure: 400
        return json({"error": {"message": "no", "type": "invalid_request_error"}}, status=400)

    async with scripted(refuse) as server:
        failed = await pipeline.run(make_settings(server.url, request=LONG, prices=PRICES, redo="length"))
    assert failed.exit_code == 1
    assert "keep their earlier one in results.jsonl" in failed.message
    assert read_jsonl(out / "results.jsonl") == first  # the old answers stay
    errors = read_jsonl(out / "errors.jsonl")
    assert sorted(e["custom_id"] for e in errors) == sorted(cut)
    assert all("earlier answer stays" in e["error"]["kept"] for e in errors)
    requests = _usage(out)["requests"]  # every line once: a result (the earlier answer), not a failure
    assert requests["succeeded"] == requests["lines"] == len(first)
    assert (requests["kept_after_failed_redo"], requests["failed"], requests["pending"]) == (len(cut), 0, 0)
    assert "a redo that failed keeps it there" in (out / "report.md").read_text()
    assert rebuild(out)["requests"] == requests  # pipeline report: the same count
    async with mock() as (url, server):
        done = await pipeline.run(make_settings(url, request=LONG, prices=PRICES))
        assert len(server.state.received) == len(cut)
    assert done.exit_code == 0
    results = read_jsonl(out / "results.jsonl")
    assert len(results) == len(first)
    assert not any(_cut(r) for r in results)
    assert sorted(r["custom_id"] for r in read_jsonl(out / "superseded.jsonl")) == sorted(cut)
    assert read_jsonl(out / "errors.jsonl") == []


async def test_a_redo_killed_mid_way_then_run_again_loses_and_doubles_nothing(
    mock, make_settings, tmp_path: Path
) -> None:
    """kill -9 while a redo's new answers are being written; the next run (plain, the new
    job recorded) finishes it: each id once in results.jsonl, its new answer; each replaced
    answer once in superseded.jsonl."""
    out = tmp_path / "out"
    job = tmp_path / "job.toml"
    job.write_text(f'input = "{tmp_path / "input.jsonl"}"\n[request]\nmax_tokens = 60\n')
    async with mock(latency=0.02, record=False) as (url, _):
        first, cut = await _first(url, make_settings, n=300)
        size = (out / "results.jsonl").stat().st_size
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "pipeline", "run", str(job), "--output", str(out), "--base-url", url),
            *("--quiet", "--redo", "length", "--concurrency", "2"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "LUMENFALL_API_KEY": FAKE_KEY},
        )
        # Killed once new answers are in results.jsonl, and before the redo is through.
        await until(lambda: (out / "results.jsonl").stat().st_size > size + 2000)
        proc.kill()
        await proc.wait()
        held = (out / "results.jsonl").read_bytes()
        assert held[: held.rfind(b"\n")].count(b"\n") + 1 > len(first)  # killed before its end
        again = await pipeline.run(make_settings(url, request=LONG, prices=PRICES))
    assert again.exit_code == 0
    results = read_jsonl(out / "results.jsonl")
    assert Counter(r["custom_id"] for r in results) == Counter(r["custom_id"] for r in first)
    assert not any(_cut(r) for r in results)
    old = {r["custom_id"]: r for r in first}
    superseded = read_jsonl(out / "superseded.jsonl")
    assert sorted(r["custom_id"] for r in superseded) == sorted(cut)
    assert all(r == old[r["custom_id"]] for r in superseded)
    assert _usage(out)["requests"]["succeeded"] == len(first)


async def test_redone_lines_are_sent_though_the_answer_cache_holds_their_request(
    mock, make_settings, tmp_path: Path
) -> None:
    ids = tmp_path / "ids.txt"
    ids.write_text("job-0\njob-2\n")
    cache = str(tmp_path / "cache")
    async with mock() as (url, server):
        await pipeline.run(make_settings(url, bodies(4), cache=cache))
        before = len(server.state.received)
        summary = await pipeline.run(make_settings(url, cache=cache, redo=f"ids:{ids}"))
        assert len(server.state.received) - before == 2  # the same requests: sent, not reused
    assert summary.reused == 0
    results = {r["custom_id"]: r for r in read_jsonl(tmp_path / "out/results.jsonl")}
    assert len(results) == 4
    assert not any(r.get("reused") for r in results.values())


async def test_a_redo_at_the_batch_tier_sends_the_lines_in_a_batch_and_keeps_the_old_ones_aside(
    make_settings, server, tmp_path: Path
) -> None:
    from pipeline.run.runner import run
    from tests.fakebatchapi import FakeBatchApi, FakeHost, at_batch_tier

    api = FakeBatchApi(max_lines=10)
    settings = at_batch_tier(make_settings(server[0], bodies(6)))
    assert (await run(settings, FakeHost(api))).exit_code == 0
    first = read_jsonl(settings.folder / "results.jsonl")
    ids = tmp_path / "ids.txt"
    ids.write_text("job-1\njob-4\n")
    again = at_batch_tier(make_settings(server[0], redo=f"ids:{ids}"))
    summary = await run(again, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert api.made == 2  # the two lines in a batch of their own
    results = read_jsonl(settings.folder / "results.jsonl")
    assert Counter(r["custom_id"] for r in results) == Counter(r["custom_id"] for r in first)
    assert sorted(r["custom_id"] for r in read_jsonl(settings.folder / "superseded.jsonl")) == [
        "job-1",
        "job-4",
    ]


async def test_shards_redone_then_merged_give_one_line_per_id_even_where_the_move_was_left_to_do(
    mock, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.output.merge import merge
    from pipeline.run import redoing

    out = tmp_path / "out"
    rows = bodies(24)
    async with mock() as (url, _):
        for k in (1, 2):
            await pipeline.run(make_settings(url, rows, request=SHORT, shard=f"{k}/2"))
        first = [r for k in (1, 2) for r in read_jsonl(out / f"shard-{k}-of-2/results.jsonl")]
        cut = sorted(r["custom_id"] for r in first if _cut(r))
        # Shard 1's run ends without moving the older answers out (as if killed right there).
        monkeypatch.setattr(redoing, "compact", lambda folder, ledger: 0)
        await pipeline.run(make_settings(url, request=LONG, shard="1/2", redo="length"))
        monkeypatch.undo()
        await pipeline.run(make_settings(url, request=LONG, shard="2/2", redo="length"))
    merged = merge(out)
    assert merged.results == 24
    assert merged.dropped == {}
    results = read_jsonl(out / "results.jsonl")
    assert Counter(r["custom_id"] for r in results) == Counter(r["custom_id"] for r in first)
    assert not any(_cut(r) for r in results)
    moved = [r for k in (1, 2) for r in read_jsonl(out / f"shard-{k}-of-2/superseded.jsonl")]
    assert sorted(r["custom_id"] for r in moved) == cut


def _schema_request(*fields: str) -> dict[str, Any]:
    properties = {name: {"type": "string"} for name in fields}
    schema = {"type": "object", "properties": properties, "required": list(fields)}
    return {"response_format": {"type": "json_schema", "json_schema": {"name": "v", "schema": schema}}}


async def test_a_redo_of_invalid_sends_the_results_a_changed_schema_fails(
    mock, make_settings, tmp_path: Path
) -> None:
    rows = bodies(4)
    async with mock() as (url, server):
        await pipeline.run(make_settings(url, rows, request=_schema_request("label"), verdict={}))
        # A field added to the schema: the answers kept fail it now.
        newer = _schema_request("label", "reason")
        before = len(server.state.received)
        summary = await pipeline.run(make_settings(url, request=newer, verdict={}, redo="invalid"))
        assert len(server.state.received) - before == 4
    assert summary.exit_code == 0
    results = read_jsonl(tmp_path / "out/results.jsonl")
    assert len(results) == 4
    assert all(set(r["parsed"]) == {"label", "reason"} for r in results)
    assert len(read_jsonl(tmp_path / "out/superseded.jsonl")) == 4
    assert _usage(tmp_path / "out")["redo"]["reasons"] == {"invalid": 4}


def test_redo_and_fresh_together_are_refused(tmp_path: Path, capsys) -> None:
    (tmp_path / "in.jsonl").write_text("")
    code = main(
        [
            "run",
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output",
            str(tmp_path),
            "--redo",
            "length",
            "--fresh",
        ]
    )
    assert code == 2
    assert "give one of the two" in capsys.readouterr().err


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=20).map(str.encode)), max_size=12))
def test_an_ids_file_gives_its_ids_or_one_clear_error(tmp_path_factory: Any, lines: list[bytes]) -> None:
    path = tmp_path_factory.mktemp("ids") / "ids.txt"
    data = b"\n".join(lines)
    path.write_bytes(data)
    error: str | None = None
    try:
        ids = read_ids(path)
    except SettingsError as e:
        error = str(e)
    if error is not None:  # one line, naming the file and the line
        assert error.startswith(f"--redo ids:{path}:")
        assert "\n" not in error
        return
    assert all(isinstance(i, str) for i in ids)
    assert len(ids) == sum(bool(line.strip()) for line in data.splitlines())  # one id a line


async def test_a_ledger_lost_while_old_and_new_answers_are_both_in_results_keeps_the_new_one(
    mock, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The index deleted after a redo killed before its move: the rebuild from results.jsonl
    keeps the newer answer of each id and moves the older to superseded.jsonl (both paid)."""
    from pipeline.run import redoing

    out = tmp_path / "out"
    async with mock() as (url, _):
        first, cut = await _first(url, make_settings, n=12)
        monkeypatch.setattr(redoing, "compact", lambda folder, ledger: 0)  # (killed before the move)
        await pipeline.run(make_settings(url, request=LONG, prices=PRICES, redo="length"))
        monkeypatch.undo()
        paid = _usage(out)["cost"]["total"]
        (out / "ledger.sqlite").unlink()
        again = await pipeline.run(make_settings(url, request=LONG, prices=PRICES))
        assert _usage(out)["cost"]["total"] == pytest.approx(paid)  # both answers still counted
        (out / "ledger.sqlite").unlink()  # and once more, the older ones in superseded.jsonl now
        assert (await pipeline.run(make_settings(url, request=LONG, prices=PRICES))).exit_code == 0
        assert _usage(out)["cost"]["total"] == pytest.approx(paid)
    assert again.exit_code == 0
    results = read_jsonl(out / "results.jsonl")
    assert Counter(r["custom_id"] for r in results) == Counter(r["custom_id"] for r in first)
    assert not any(_cut(r) for r in results)  # the newer answers, paid for, kept
    old = {r["custom_id"]: r for r in first}
    assert sorted(r["custom_id"] for r in read_jsonl(out / "superseded.jsonl")) == sorted(cut)
    assert all(r == old[r["custom_id"]] for r in read_jsonl(out / "superseded.jsonl"))
