"""The answer cache in a run (issue 23, point 2): a request answered before, by any run into
any folder, is taken from the cache instead of sent; identical requests in flight at once
are sent once; exactly once holds through it."""

from __future__ import annotations

from pathlib import Path

import orjson

import pipeline
from tests.conftest import bodies, read_jsonl, until, write_jsonl

PRICES = {"test/model": {"prompt": 1.0, "completion": 2.0}}


def _usage(folder: Path) -> dict:
    return orjson.loads((folder / "usage.json").read_bytes())


async def test_a_second_run_into_another_folder_sends_nothing_and_says_what_it_saved(
    mock, make_settings, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    rows = bodies(20)
    async with mock() as (url, server):
        first = await pipeline.run(make_settings(url, rows, cache=str(cache), job=None, prices=PRICES))
        sent = len(server.state.received)
        second = await pipeline.run(
            make_settings(url, rows, cache=str(cache), output=tmp_path / "again", prices=PRICES)
        )
        assert len(server.state.received) == sent == 20  # the second run sent nothing
    assert first.exit_code == second.exit_code == 0
    before = {r["custom_id"]: r for r in read_jsonl(tmp_path / "out/results.jsonl")}
    after = {r["custom_id"]: r for r in read_jsonl(tmp_path / "again/results.jsonl")}
    assert after.keys() == before.keys()
    for custom_id, result in after.items():
        assert result["reused"] is True
        assert result["response"]["body"] == before[custom_id]["response"]["body"]
        assert "reused" not in before[custom_id]
    usage = _usage(tmp_path / "again")
    paid = _usage(tmp_path / "out")
    assert usage["reused"]["requests"] == 20
    assert usage["reused"]["cost_not_spent"] == paid["cost"]["total"] > 0
    assert usage["cost"]["total"] in (0, None)
    assert usage["answers_by_status"] == {}


def _same(n: int, text: str = "the same question") -> list[dict]:
    return [
        {"custom_id": f"same-{i}", "model": "test/model", "messages": [{"role": "user", "content": text}]}
        for i in range(n)
    ]


async def test_identical_lines_in_flight_at_once_are_sent_once(mock, make_settings, tmp_path: Path) -> None:
    # Slow answers: all ten are in flight together, so the cache holds none of them yet.
    async with mock(latency=0.3) as (url, server):
        summary = await pipeline.run(make_settings(url, _same(10), cache=str(tmp_path / "cache")))
        assert len(server.state.received) == 1
    assert summary.exit_code == 0
    assert summary.succeeded == 10
    assert summary.reused == 9
    results = read_jsonl(tmp_path / "out/results.jsonl")
    assert sorted(r["custom_id"] for r in results) == [f"same-{i}" for i in range(10)]
    assert sum(r.get("reused") is True for r in results) == 9
    assert len({orjson.dumps(r["response"]["body"]) for r in results}) == 1
    usage = _usage(tmp_path / "out")
    assert usage["answers_by_status"] == {"200": 1}
    assert usage["models"]["test/model"]["requests"] == 1  # paid once
    assert usage["reused"]["requests"] == 9


VERDICT_REQUEST = {
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "v",
            "schema": {
                "type": "object",
                "properties": {"flagged": {"type": "boolean"}},
                "required": ["flagged"],
            },
        },
    }
}


async def test_a_kept_answer_the_verdict_now_fails_is_sent_again(mock, make_settings, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    async with mock() as (url, server):
        first = await pipeline.run(make_settings(url, bodies(4), cache=cache, request=VERDICT_REQUEST))
        assert first.exit_code == 0
        assert len(server.state.received) == 4
        # The same requests, judged by a stricter verdict that no kept answer keeps.
        strict = {"schema": {"type": "object", "required": ["flagged", "reason"]}, "max_attempts": 1}
        second = await pipeline.run(
            make_settings(
                url,
                bodies(4),
                cache=cache,
                request=VERDICT_REQUEST,
                verdict=strict,
                output=tmp_path / "strict",
            )
        )
        assert len(server.state.received) == 8  # sent, not taken from the cache
    assert second.reused == 0
    assert not (tmp_path / "strict/results.jsonl").exists() or not read_jsonl(
        tmp_path / "strict/results.jsonl"
    )
    assert len(read_jsonl(tmp_path / "strict/errors.jsonl")) == 4


async def test_a_damaged_cache_is_one_warning_and_the_run_goes_on(
    mock, make_settings, tmp_path: Path, capsys
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "answers.sqlite").write_bytes(b"this is not a database, " * 200)
    async with mock() as (url, server):
        summary = await pipeline.run(make_settings(url, bodies(5), cache=str(cache)))
        assert len(server.state.received) == 5
    assert summary.exit_code == 0
    assert summary.succeeded == 5
    said = capsys.readouterr().err
    assert said.count("warning: answer cache") == 1
    assert "the run goes on without it" in said
    assert "damaged" in said
    assert sorted(r["custom_id"] for r in read_jsonl(tmp_path / "out/results.jsonl")) == [
        f"job-{i}" for i in range(5)
    ]


async def test_a_batch_run_takes_a_cache_too(make_settings, tmp_path: Path) -> None:
    # (what it does with it: tests/test_cache_batch.py)
    settings = make_settings("http://127.0.0.1:9", bodies(1), cache=str(tmp_path / "c"), tier="batch")
    assert settings.cache == tmp_path / "c"


async def test_two_shard_processes_share_one_cache_and_lose_or_double_nothing(mock, tmp_path: Path) -> None:
    from collections import Counter

    from tests.test_crash import start

    n = 400
    src = write_jsonl(tmp_path / "in.jsonl", bodies(n))
    cache = str(tmp_path / "cache")

    async def shards(out: Path) -> None:
        procs = [await start(url, src, out, "--cache", cache, "--shard", f"{k}/2") for k in (1, 2)]
        for proc in procs:
            _, stderr = await proc.communicate()
            assert proc.returncode == 0, stderr.decode()

    def results(out: Path) -> list[dict]:
        return [r for k in (1, 2) for r in read_jsonl(out / f"shard-{k}-of-2/results.jsonl")]

    async with mock(record=False) as (url, server):
        await shards(tmp_path / "first")
        sent = server.state.statuses["200"]
        await shards(tmp_path / "second")
        assert server.state.statuses["200"] == sent == n  # the second pair sent nothing
    for out, reused in (("first", False), ("second", True)):
        ids = Counter(r["custom_id"] for r in results(tmp_path / out))
        assert sorted(ids) == sorted(f"job-{i}" for i in range(n))
        assert max(ids.values()) == 1
        assert all(r.get("reused", False) is reused for r in results(tmp_path / out))


async def test_kill_9_while_reusing_then_resume_gives_every_line_once(mock, tmp_path: Path) -> None:
    from collections import Counter

    from tests.test_crash import start, whole_lines

    n = 1200
    cache = str(tmp_path / "cache")
    src = write_jsonl(tmp_path / "in.jsonl", bodies(n))
    half = write_jsonl(tmp_path / "half.jsonl", bodies(n // 2))
    out = tmp_path / "out"
    async with mock(latency=0.05, record=False) as (url, server):
        proc = await start(url, half, tmp_path / "filled", "--cache", cache, "--concurrency", "64")
        _, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        # The whole input: its first half is in the cache, the second is sent; killed midway.
        proc = await start(url, src, out, "--cache", cache, "--concurrency", "32")
        await until(lambda: server.state.statuses["200"] >= n // 2 + 100)
        proc.kill()
        await proc.wait()
        ids = Counter(r["custom_id"] for r in whole_lines(out / "results.jsonl"))
        assert 0 < len(ids) < n
        assert max(ids.values()) == 1
        proc = await start(url, src, out, "--cache", cache, "--concurrency", "32")
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
        sent = server.state.statuses["200"]
    assert b" reused)" in stdout
    assert b"not spent (answers reused)" in stdout
    lines = read_jsonl(out / "results.jsonl")
    ids = Counter(r["custom_id"] for r in lines)
    assert sorted(ids) == sorted(f"job-{i}" for i in range(n))
    assert max(ids.values()) == 1
    reused = sum(r.get("reused") is True for r in lines)
    assert reused >= n // 2  # the cached half, at least (and what the killed run had kept)
    # Each line was paid for once at most: what was sent is the half not cached, plus the
    # answers the kill cut before they were written (sent again, or taken from the cache).
    assert n - reused <= sent - n // 2 <= n - reused + 200
    usage = _usage(out)
    assert usage["reused"]["requests"] == reused
    assert usage["requests"]["succeeded"] == n


def test_a_job_file_names_the_cache_relative_to_itself(tmp_path: Path) -> None:
    from pipeline.settings import build

    job = tmp_path / "jobs" / "nightly.toml"
    job.parent.mkdir()
    job.write_text('input = "in.jsonl"\ncache = "../answers"\ncache_max_gb = 2\n')
    settings = build(job)
    assert settings.cache == tmp_path / "answers"
    assert settings.cache_max_gb == 2
    assert build(job, cache=str(tmp_path / "elsewhere")).cache == tmp_path / "elsewhere"


def test_a_cache_bound_without_a_cache_is_refused_in_one_line(tmp_path: Path) -> None:
    import pytest

    from pipeline.errors import SettingsError
    from pipeline.settings import build

    # It would be ignored: the user believes answers are kept, and none are.
    with pytest.raises(SettingsError, match=r"--cache-max-gb bounds the answer cache.*give --cache DIR"):
        build(input=str(tmp_path / "in.jsonl"), cache_max_gb=2.0)
    assert (
        build(input=str(tmp_path / "in.jsonl"), cache_max_gb=2.0, cache=str(tmp_path / "c")).cache_max_gb == 2
    )


async def test_a_request_waiting_for_its_twin_leaves_its_seat_to_another(
    mock, make_settings, tmp_path: Path
) -> None:
    # Two seats: the first line is sent, its twins wait for its answer out of the crew, and
    # the different last line takes a free seat and is sent beside the first.
    rows = [
        *_same(3),
        {"custom_id": "other", "model": "test/model", "messages": [{"role": "user", "content": "x"}]},
    ]
    async with mock(latency=0.3) as (url, server):
        summary = await pipeline.run(make_settings(url, rows, cache=str(tmp_path / "cache"), concurrency=2))
        assert len(server.state.received) == 2
        assert server.state.max_in_flight == 2
    assert summary.succeeded == 4
    assert summary.reused == 2


async def test_a_kept_answer_the_verdict_fails_is_replaced_by_the_one_sent_for_it(
    mock, make_settings, tmp_path: Path
) -> None:
    cache = str(tmp_path / "cache")
    async with mock(script=["chatty"] * 4) as (url, server):  # (prose where JSON was asked)
        first = await pipeline.run(make_settings(url, bodies(4), cache=cache, request=VERDICT_REQUEST))
        assert first.exit_code == 0
        judged = {"request": VERDICT_REQUEST, "verdict": {"max_attempts": 1}}
        second = await pipeline.run(
            make_settings(url, bodies(4), cache=cache, output=tmp_path / "b", **judged)
        )
        assert second.exit_code == 0
        assert second.reused == 0
        assert len(server.state.received) == 8  # the kept prose failed the verdict: sent again
        third = await pipeline.run(
            make_settings(url, bodies(4), cache=cache, output=tmp_path / "c", **judged)
        )
        # The answers the second run bought were kept in place of the prose, where they were
        # ignored (the first answer of a key stayed) and every later run bought them again.
        assert len(server.state.received) == 8
    assert third.reused == 4


async def test_twins_of_a_request_that_keeps_failing_are_sent_at_once(
    mock, make_settings, tmp_path: Path
) -> None:
    # Six identical lines every one of which the server refuses: the first is sent, then the
    # second (the first's failure is handed to no one), then, the key failing, the other four
    # together, where one by one six lines took six round trips (a thousand, a thousand).
    async with mock(latency=0.2, script=[400] * 6) as (url, server):
        summary = await pipeline.run(
            make_settings(url, _same(6), cache=str(tmp_path / "cache"), max_attempts=1)
        )
        assert len(server.state.received) == 6
        assert server.state.max_in_flight == 4
    assert summary.failed == 6
    assert len(read_jsonl(tmp_path / "out/errors.jsonl")) == 6
