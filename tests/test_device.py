"""What the output folder's device cannot do. A full disk is a stop, not a bug: a real small
filesystem (a tmpfs this test mounts) fills up during a run, which stops with exit 3 and one
line saying where and what was kept; grown, the same command finishes the job, every line
once, nothing kept asked for again. A filesystem that gives no locks is refused by name."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

import pipeline
from pipeline.cli import _merge, main
from pipeline.output.device import Mount, device, mount_of, unwritable
from tests.conftest import bodies, write_jsonl
from tests.test_crash import start, whole_lines


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True, capture_output=True)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[None]:
    """A tmpfs of `size` on `path`; CI runs as root, so there a failure to mount fails."""
    path.mkdir()
    try:
        _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    except (OSError, subprocess.CalledProcessError) as e:
        said = e.stderr.decode().strip() if isinstance(e, subprocess.CalledProcessError) else str(e)
        message = f"cannot mount a tmpfs on {path} ({said}): this test needs root"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield
    finally:
        if subprocess.run(["umount", str(path)], check=False, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def resumed_once(out: Path, every: list[str], asked_again: list[str], kept_first: set[str]) -> None:
    """Every line a result once after the resume, and nothing kept before it bought again
    (`asked_again`: the questions the resume sent; line i asks "question i")."""
    ids = Counter(r["custom_id"] for r in whole_lines(out / "results.jsonl"))
    assert set(ids) == set(every)
    assert max(ids.values()) == 1
    questions = {f"question {i}": custom_id for i, custom_id in enumerate(every)}
    assert not {questions[q] for q in asked_again} & kept_first


async def test_a_full_disk_is_a_stop_and_the_same_command_resumes_once_there_is_room(
    mock, tmp_path: Path
) -> None:
    n, concurrency = 3000, 16
    src = write_jsonl(tmp_path / "in.jsonl", bodies(n))
    disk = tmp_path / "disk"
    with tmpfs(disk, "1m"):
        out = disk / "out"
        async with mock() as (url, server):
            proc = await start(url, src, out, "--concurrency", str(concurrency))
            said, err = await proc.communicate()
            assert proc.returncode == 3, (said, err)
            asked_first = len(server.state.received)
            line = said.decode().strip()
            assert "\n" not in line
            assert "Traceback" not in err.decode()
            kept_first = {r["custom_id"] for r in whole_lines(out / "results.jsonl")}
            # Which folder, which device, what is kept, what next: on one line.
            assert f"cannot write to {out} (" in line
            assert "No space left on device" in line or "database or disk is full" in line
            assert f"tmpfs mounted at {disk}" in line
            assert f": {len(kept_first):,} results kept there" in line
            assert "make room there, then run the same command again to resume" in line
            # It stopped at once: what it asked for is what it kept, what it says it could not
            # write, and no more.
            lost = re.search(r"; ([\d,]+) answers? arrived but could not be written", line)
            lost_count = int(lost.group(1).replace(",", "")) if lost else 0
            assert asked_first == len(kept_first) + lost_count
            assert lost_count <= 2 * concurrency
            assert 0 < len(kept_first) < n

            _mount("-o", "remount,size=16m", str(disk))
            proc = await start(url, src, out)
            said, err = await proc.communicate()
            assert proc.returncode == 0, (said, err)
            asked_again = [b["messages"][0]["content"] for b in server.state.received[asked_first:]]
        resumed_once(out, [f"job-{i}" for i in range(n)], asked_again, kept_first)  # (still mounted)
    assert len(asked_again) == n - len(kept_first)


@pytest.mark.parametrize("code", [errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS], ids=errno.errorcode.get)
def test_a_folder_on_a_filesystem_without_locks_is_refused_naming_it(
    code: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = fcntl.flock

    def no_locks(fd: int, operation: int) -> None:
        if operation & fcntl.LOCK_EX:
            raise OSError(code, os.strerror(code))
        real(fd, operation)

    monkeypatch.setattr(fcntl, "flock", no_locks)
    src = write_jsonl(tmp_path / "in.jsonl", bodies(1))
    out = tmp_path / "out"
    status = main(["run", "--input", str(src), "--output", str(out), "--base-url", "http://127.0.0.1:9/v1"])
    err = capsys.readouterr().err
    assert status == 2
    assert f"cannot lock {out}: its filesystem (" in err
    assert os.strerror(code) in err
    assert "use a folder on a local disk for --output, or a mount with locking enabled" in err
    assert not (out / "ledger.sqlite").exists()  # nothing was written, nothing sent


def test_the_filesystem_of_a_folder_is_named_from_the_mount_table(tmp_path: Path) -> None:
    mount = mount_of(tmp_path)
    assert mount is not None
    assert str(tmp_path).startswith(mount.point)
    assert f" {mount.fstype} " in Path("/proc/self/mounts").read_text()
    with tmpfs(tmp_path / "small", "64k"):
        assert mount_of(tmp_path / "small") == Mount(str(tmp_path / "small"), "tmpfs", "tmpfs")
        assert device(tmp_path / "small").startswith(f"tmpfs mounted at {tmp_path / 'small'}, ")
        assert mount_of(tmp_path / "small" / "not" / "made") == mount_of(tmp_path / "small")


async def test_a_merge_or_a_report_on_a_filesystem_without_locks_is_refused_naming_it(
    mock, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    async with mock() as (url, _):
        for k in (1, 2):
            await pipeline.run(make_settings(url, bodies(6), output=out, shard=f"{k}/2"))

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert _merge(out, partial=False) == 2
    err = capsys.readouterr().err
    assert f"cannot lock {out}: its filesystem (" in err
    assert "use a folder on a local disk for --output" in err
    assert not (out / "results.jsonl").exists()
    # pipeline report locks too (to know no run or merge writes there): the same refusal, not
    # "cannot write ...; fix that (a disk failing?)" and exit 3
    for folder in (out, out / "shard-1-of-2"):
        assert main(["report", str(folder)]) == 2
        err = capsys.readouterr().err
        assert f"pipeline report: error: cannot lock {folder}: its filesystem (" in err
        assert "use a folder on a local disk for --output" in err


async def test_a_full_sqlite_temporary_folder_is_named_and_what_was_kept_is_counted_right(
    mock, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ids a run has read (to find duplicates) are in SQLite's temporary store, which is in
    # SQLITE_TMPDIR, TMPDIR or /var/tmp, not in the output folder. When that fills up, the stop
    # named the output folder and its device, with gigabytes free, and said "make room there";
    # and SQLite, failing a COMMIT on its temporary store after writing the index whole, left
    # the run counting half the results it had kept.
    n = 3000
    rows = [{**row, "custom_id": f"{i:05d}-" + "x" * 500} for i, row in enumerate(bodies(n))]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    temp = tmp_path / "sqlite-temp"
    with tmpfs(temp, "64k"):
        monkeypatch.setenv("SQLITE_TMPDIR", str(temp))
        async with mock() as (url, server):
            proc = await start(url, src, out, "--concurrency", "16")
            said, err = await proc.communicate()
            assert proc.returncode == 3, (said, err)
            asked_first = len(server.state.received)
            line = said.decode().strip()
            kept_first = {r["custom_id"] for r in whole_lines(out / "results.jsonl")}
            assert f"cannot write to {out} (database or disk is full; " in line
            assert f"SQLite keeps its temporary files in {temp} (tmpfs mounted at {temp}, " in line
            assert "or set SQLITE_TMPDIR to a folder with room, then run the same command again" in line
            assert f": {len(kept_first):,} results kept there" in line
            assert 0 < len(kept_first) < n

            monkeypatch.setenv("SQLITE_TMPDIR", str(tmp_path))
            proc = await start(url, src, out)
            said, err = await proc.communicate()
            assert proc.returncode == 0, (said, err)
            asked_again = [b["messages"][0]["content"] for b in server.state.received[asked_first:]]
    resumed_once(out, [row["custom_id"] for row in rows], asked_again, kept_first)


def test_sqlite_full_where_only_the_folder_is_out_of_room_names_the_folder_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite says "database or disk is full" for its own file in the folder as for its
    # temporary store elsewhere. Where the folder's device is the one with no room left, the
    # stop says to make room there, not to look at a temporary folder with gigabytes free (a
    # full disk's stop read either way, by which of the two SQLite met first).
    disk = tmp_path / "disk"
    roomy = tmp_path / "temp"
    roomy.mkdir()
    monkeypatch.setenv("SQLITE_TMPDIR", str(roomy))
    full = sqlite3.OperationalError("database or disk is full")
    with tmpfs(disk, "1m"):
        out = disk / "out"
        out.mkdir()
        with contextlib.suppress(OSError), (disk / "filler").open("wb") as f:
            while True:
                f.write(b"x" * 65536)
                f.flush()
        line = unwritable(out, full, kept=12)
    assert f"cannot write to {out} (database or disk is full; tmpfs mounted at {disk}" in line
    assert line.endswith(
        ": 12 results kept there; make room there, then run the same command again to resume"
    )
    assert "SQLite keeps its temporary files" not in line
