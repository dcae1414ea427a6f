"""`pipeline merge` checks what it joins: a shard a killed run left is repaired first (or
refused by name), no id is merged twice nor as both a result and an error, and a merge holds
OUT and every shard while it works, so that neither a second merge nor a run gets in."""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

import pipeline
from pipeline.cli import main
from pipeline.errors import FolderBusy, SettingsError
from pipeline.input.shard import Shard
from pipeline.output.folder import lock_folder
from pipeline.output.ledger import Ledger
from pipeline.output.merge import Merged, merge
from tests.conftest import bodies, read_jsonl, write_jsonl
from tests.test_crash import start

N = 200


def ids(path: Path) -> Counter[str]:
    return Counter(r["custom_id"] for r in read_jsonl(path))


def request_errors(path: Path) -> Counter[str]:
    """The ids of errors.jsonl's failed requests (an input error is keyed by its line)."""
    return Counter(r["custom_id"] for r in read_jsonl(path) if r["attempts"])


def assert_exactly_once(folder: Path, every: set[str]) -> None:
    """Every id once: a result or a current error, never both, never twice."""
    done, failed = ids(folder / "results.jsonl"), request_errors(folder / "errors.jsonl")
    assert [i for i, n in done.items() if n > 1] == []
    assert [i for i, n in failed.items() if n > 1] == []
    assert set(done) & set(failed) == set()
    assert set(done) | set(failed) == every


def hangs(server: Any) -> asyncio.Event:
    """Set once the mock takes its first "timeout" action: a request that hangs is in flight,
    and what the run got before it has been written."""
    hanging = asyncio.Event()
    pick = server._pick

    def picked() -> str | None:
        action = pick()
        if action == "timeout":
            hanging.set()
        return action

    server._pick = picked
    return hanging


async def two_shards_with_failures(mock: Any, make_settings: Any, src: Path, out: Path) -> None:
    """Both shards end with exit 1: a quarter of the requests answered 500, one attempt each."""
    async with mock(fail_rate=0.25, record=False) as (url, _):
        for k in (1, 2):
            summary = await pipeline.run(
                make_settings(url, input=src, output=out, shard=f"{k}/2", max_attempts=1)
            )
            assert (summary.exit_code, summary.pending) == (1, 0)


async def test_a_shard_killed_while_it_reruns_its_failures_merges_exactly_once(
    mock, make_settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The scenario: shard 1 is run again to retry its failures; three come right, two
    # fail again, and it is killed (SIGKILL) while the next one is in flight. It had rewritten
    # its errors.jsonl at its start and appended to both files since; no end record was written.
    src = write_jsonl(tmp_path / "in.jsonl", bodies(N))
    out = tmp_path / "out"
    await two_shards_with_failures(mock, make_settings, src, out)
    shard = out / "shard-1-of-2"
    failed_before = request_errors(shard / "errors.jsonl")
    assert len(failed_before) > 6
    async with mock(script=["ok"] * 3 + [500] * 2 + ["timeout"] * N, record=False) as (url, server):
        hanging = hangs(server)
        flags = ("--shard", "1/2", "--max-attempts", "1", "--concurrency", "1", "--timeout", "60")
        proc = await start(url, src, out, *flags)
        await asyncio.wait_for(hanging.wait(), timeout=30)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    # What the killed run left: ids that came right are listed as failed too, and the ones that
    # failed again are listed twice (the state the merge copied as it was).
    assert len(ids(shard / "results.jsonl") & failed_before) == 3
    assert sum(request_errors(shard / "errors.jsonl").values()) == len(failed_before) + 2

    assert main(["merge", str(out)]) == 0
    every = {f"job-{i}" for i in range(N)}
    assert_exactly_once(out, every)
    assert "shard 1 of 2: its last run, started" in capsys.readouterr().out  # the repair is named
    assert_exactly_once(shard, {i for i in every if Shard(1, 2).owns(i)})  # and the shard's own
    assert len(request_errors(out / "errors.jsonl")) == len(failed_before) - 3 + len(
        request_errors(out / "shard-2-of-2/errors.jsonl")
    )


@pytest.fixture
async def finished(mock, make_settings, tmp_path: Path) -> tuple[Path, set[str]]:
    """Two shards, each ended with failures; OUT and every input id."""
    src = write_jsonl(tmp_path / "in.jsonl", bodies(N))
    out = tmp_path / "out"
    await two_shards_with_failures(mock, make_settings, src, out)
    return out, {f"job-{i}" for i in range(N)}


def result_for(shard: Path, custom_id: str) -> bytes:
    """A whole result line for `custom_id`, as a run appends it."""
    line = orjson.loads((shard / "results.jsonl").read_bytes().splitlines()[0])
    return orjson.dumps({**line, "custom_id": custom_id}) + b"\n"


@pytest.mark.parametrize("left", ["a result past the index", "a torn last line", "both"])
def test_a_shard_a_killed_run_left_before_runs_said_so_is_repaired_first(
    finished: tuple[Path, set[str]], left: str
) -> None:
    # A folder from before a run marked its start: a killed rerun shows only in its files. It
    # got an answer for a line listed as failed (appended, not yet indexed), or tore its last
    # line as it was killed, or both.
    out, every = finished
    shard = out / "shard-1-of-2"
    came_right = sorted(request_errors(shard / "errors.jsonl"))[0]
    with (shard / "results.jsonl").open("ab") as f:
        if left != "a torn last line":
            f.write(result_for(shard, came_right))
        if left != "a result past the index":
            f.write(b'{"id":"batch_req_1","custom_id":"job-')
    merged = merge(out)
    assert_exactly_once(out, every)
    assert_exactly_once(shard, {i for i in every if Shard(1, 2).owns(i)})
    assert (shard / "results.jsonl").read_bytes().endswith(b"\n")  # the torn line is cut
    if left != "a torn last line":
        assert came_right in ids(out / "results.jsonl")
    assert len(merged.repaired) == 1
    assert "shard 1 of 2: its results.jsonl is" in str(merged)
    assert merged.dropped == {}


def test_an_id_twice_in_the_shards_is_merged_once_and_said(finished: tuple[Path, set[str]]) -> None:
    # Bugs elsewhere, which no repair can see: a result line written twice and indexed past (a
    # checkpoint that lost ids), a failure listed for an id that is a result, one listed by two
    # shards. The merge keeps one line an id (the result), and says what it left out.
    out, every = finished
    one, two = out / "shard-1-of-2", out / "shard-2-of-2"
    again = (two / "results.jsonl").read_bytes().splitlines(keepends=True)[5]
    with (two / "results.jsonl").open("ab") as f:
        f.write(again)
    ledger = Ledger(one / "ledger.sqlite")
    listed_twice = next(row for row in ledger.failures() if row[2] == "request")
    ledger.close()
    ledger = Ledger(two / "ledger.sqlite")
    ledger.put("results_offset", (two / "results.jsonl").stat().st_size)
    succeeded = orjson.loads(again)["custom_id"]
    ledger.add_failed([(succeeded, 1, "request", orjson.dumps({"custom_id": succeeded}) + b"\n")])
    ledger.add_failed([(listed_twice[1], listed_twice[0], "request", listed_twice[3])])
    ledger.close()
    merged = merge(out)
    assert_exactly_once(out, every)
    assert merged.results == len(every) - merged.errors
    assert merged.dropped == {"results twice": 1, "failures of ids that are results": 1, "failures twice": 1}
    assert "; left out 3 line(s) of ids merged already (results twice: 1, " in str(merged)


def test_a_shard_whose_results_were_cut_short_is_refused_by_name(finished: tuple[Path, set[str]]) -> None:
    # Shorter than its index: results it held are gone, and no repair can say which lines
    # they answered. Its next run sends those again.
    out, _ = finished
    results = out / "shard-2-of-2/results.jsonl"
    results.write_bytes(results.read_bytes()[:-100])
    with pytest.raises(
        SettingsError, match=r"shard 2 of 2 has a results\.jsonl shorter than its index"
    ) as refused:
        merge(out)
    assert f"run `pipeline run JOB --shard 2/2 --output {out}` again" in str(refused.value)


async def test_a_shard_whose_ledger_is_gone_is_refused_with_the_command_that_rebuilds_it(
    mock, make_settings, finished: tuple[Path, set[str]]
) -> None:
    # Deleted or not copied along: merge said "has no ledger.sqlite: it never ran" of a folder
    # holding results, and named no command. A run rebuilds the index from results.jsonl.
    out, every = finished
    shard = out / "shard-2-of-2"
    held = len(read_jsonl(shard / "results.jsonl"))
    for name in ("ledger.sqlite", "ledger.sqlite-wal", "ledger.sqlite-shm"):
        (shard / name).unlink(missing_ok=True)
    with pytest.raises(SettingsError) as refused:
        merge(out)
    assert f"shard 2 of 2 has lost its ledger.sqlite (results.jsonl holds {held:,} lines): " in str(
        refused.value
    )
    assert f"run `pipeline run JOB --shard 2/2 --output {out}` again" in str(refused.value)
    async with mock(record=False) as (url, _):
        summary = await pipeline.run(
            make_settings(url, input=out.parent / "in.jsonl", output=out, shard="2/2")
        )
    assert (summary.exit_code, summary.skipped) == (0, held)  # what it held is not asked for again
    merge(out)
    assert_exactly_once(out, every)


def test_a_partial_merge_does_not_say_nothing_is_pending(finished: tuple[Path, set[str]]) -> None:
    # Shard 2 never finished a run (killed in its first, or not run yet): a partial merge said
    # "0 pending", in its line and in usage.json, of a job with half its lines not done.
    out, _ = finished
    (out / "shard-2-of-2/ledger.sqlite").unlink()
    (out / "shard-2-of-2/results.jsonl").unlink()
    (out / "shard-2-of-2/errors.jsonl").unlink()
    partial = merge(out, partial=True)
    assert partial.pending is None
    assert "failures, an unknown number pending (" in str(partial)
    assert orjson.loads((out / "usage.json").read_bytes())["requests"]["pending"] is None


@pytest.fixture
def pause_first_merge(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """A merge in the thread named "first" stops at its first fsync (it holds its locks by
    then) until `go` is set; `paused` says it is there."""
    paused, go = threading.Event(), threading.Event()
    fsync = os.fsync

    def held_fsync(fd: int) -> None:
        if threading.current_thread().name == "first" and not paused.is_set():
            paused.set()
            assert go.wait(timeout=30)
        fsync(fd)

    monkeypatch.setattr(os, "fsync", held_fsync)
    yield paused, go
    go.set()


def in_thread(
    name: str, target: Any, *args: Any, ended: threading.Event | None = None, **kwargs: Any
) -> tuple[threading.Thread, list[Any]]:
    """Run `target` in a thread; the list gets what it returned or raised, then `ended` is set."""
    outcome: list[Any] = []

    def call() -> None:
        try:
            outcome.append(target(*args, **kwargs))
        except BaseException as e:  # handed to the test
            outcome.append(e)
        if ended is not None:
            ended.set()

    thread = threading.Thread(target=call, name=name, daemon=True)
    thread.start()
    return thread, outcome


def test_a_second_merge_at_once_waits_for_the_first(
    finished: tuple[Path, set[str]], pause_first_merge: tuple[threading.Event, threading.Event]
) -> None:
    # The Ray driver's merge and a person's, at once: the second waits, then merges too.
    out, every = finished
    paused, go = pause_first_merge
    first, first_outcome = in_thread("first", merge, out)
    assert paused.wait(timeout=30)
    moved = threading.Event()
    said: list[str] = []

    def say(text: str) -> None:
        said.append(text)
        moved.set()

    second, second_outcome = in_thread("second", merge, out, say=say, ended=moved)
    assert moved.wait(timeout=30)  # it says it waits (or it ended: wrongly, while the first works)
    assert second_outcome == []  # still waiting
    assert said == [
        f"pipeline merge: waiting for another merge of {out} (pipeline merge, pid {os.getpid()} on {socket.gethostname()}) to end"
    ]
    go.set()
    first.join(timeout=30)
    second.join(timeout=30)
    assert [type(o) for o in first_outcome + second_outcome] == [Merged, Merged]
    assert first_outcome[0].results == second_outcome[0].results
    assert_exactly_once(out, every)
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == [".lock", ".merge.lock"]


async def test_no_run_gets_into_a_merge_nor_a_merge_into_a_run(
    mock,
    make_settings,
    finished: tuple[Path, set[str]],
    pause_first_merge: tuple[threading.Event, threading.Event],
) -> None:
    out, every = finished
    paused, go = pause_first_merge
    async with mock(script=["timeout"] * N, record=False) as (url, server):
        shard_1 = make_settings(
            url, input=out.parent / "in.jsonl", output=out, shard="1/2", max_attempts=1, timeout=60
        )
        # A shard running now: refused by name (and left out of a partial merge).
        hanging = hangs(server)
        running = asyncio.create_task(pipeline.run(shard_1))
        await asyncio.wait_for(hanging.wait(), timeout=30)
        with pytest.raises(SettingsError, match="shard 1 of 2 is running now"):
            merge(out)
        partial = merge(out, partial=True)
        assert (partial.shards, partial.missing) == (1, ["shard 1 of 2 is running now"])
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        # A merge under way: a run into a shard, or into OUT itself, is refused until it ends.
        first, outcome = in_thread("first", merge, out)
        assert paused.wait(timeout=30)
        with pytest.raises(FolderBusy):
            await asyncio.wait_for(pipeline.run(shard_1), timeout=10)  # refused at once, if at all
        with pytest.raises(FolderBusy):
            await pipeline.run(make_settings(url, input=out.parent / "in.jsonl", output=out))
        go.set()
        first.join(timeout=30)
    assert isinstance(outcome[0], Merged)
    assert_exactly_once(out, every)
    # A run writing into OUT itself: the merge is refused, and so it is where one wrote before.
    with lock_folder(out), pytest.raises(SettingsError, match=f"a run is writing into {out} itself now"):
        merge(out)
    (out / "ledger.sqlite").touch()
    with pytest.raises(SettingsError, match="holds the files of a run that was not sharded"):
        merge(out)


def test_a_merge_that_cannot_write_stops_and_keeps_no_half_file(
    finished: tuple[Path, set[str]], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out, every = finished
    fsync = os.fsync

    def full(fd: int) -> None:
        monkeypatch.setattr(os, "fsync", fsync)  # once
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    assert main(["merge", str(out)]) == 3
    said = capsys.readouterr().err
    assert f"pipeline merge: stopped: cannot write to {out} (No space left on device" in said
    assert "then run the same command again to merge" in said
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [".lock", ".merge.lock"]
    assert main(["merge", str(out)]) == 0  # once there is room
    assert_exactly_once(out, every)


class Killed(BaseException):
    """The merge's process killed at this point (nothing after it runs)."""


async def test_a_merge_killed_between_its_two_files_leaves_no_id_both(
    finished: tuple[Path, set[str]], mock, make_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Merged once with failures; the shards run again and their failures come right; the
    # next merge is killed between replacing the one file and the other (the kill bench's
    # merge kills found 36 ids both a result and an error so: the new results beside the
    # earlier errors). Whichever comes first, OUT must not hold an id both.
    out, every = finished
    assert merge(out).errors > 0
    src = out.parent / "in.jsonl"  # the job's input, as `finished` wrote it
    async with mock(record=False) as (url, _):
        for k in (1, 2):
            await pipeline.run(make_settings(url, input=src, output=out, shard=f"{k}/2"))
    replace, renamed = os.replace, []

    def killed_at_the_second(source: Any, target: Any) -> None:
        if Path(target).name in ("results.jsonl", "errors.jsonl") and Path(target).parent == out:
            renamed.append(Path(target).name)
            if len(renamed) == 2:
                raise Killed
        replace(source, target)

    monkeypatch.setattr(os, "replace", killed_at_the_second)
    with pytest.raises(Killed):
        merge(out)
    monkeypatch.setattr(os, "replace", replace)
    done, failed = ids(out / "results.jsonl"), request_errors(out / "errors.jsonl")
    assert set(done) & set(failed) == set()
    assert max(done.values()) == 1
    merge(out)  # and merged again, whole
    assert_exactly_once(out, every)
    assert read_jsonl(out / "errors.jsonl") == []
