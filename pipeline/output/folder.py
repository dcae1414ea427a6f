"""The output folder as a whole, before and around a run: its lock, `--fresh`, the job it
holds (a different job is refused, naming what differs), and files replaced whole or not at
all. (The repair after a crash: `pipeline.output.repair`.)

    OUT/.lock           held while a run writes here; a second run into the folder is refused
    OUT/previous-<time> where `--fresh` moves an earlier run's files (its ledger, with the book
                        of its batches still at the provider: `pipeline cancel` reaches them there)
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from pipeline.errors import FolderBusy, RunStopped, SettingsError
from pipeline.output.device import NO_LOCKS, is_full, no_locks, unwritable
from pipeline.output.ledger import Ledger

RESULTS = "results.jsonl"
ERRORS = "errors.jsonl"
LEDGER = "ledger.sqlite"
OUR_FILES = (
    RESULTS,
    ERRORS,
    "usage.json",
    "report.md",
    "report.html",
    LEDGER,
    LEDGER + "-wal",
    LEDGER + "-shm",
    "batches",  # the batch tier's staged files (`pipeline.batch.book`), which its book names
)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` whole or not at all: a temporary file, synced, then renamed."""
    write_lines(path, [data])


def remove(path: Path) -> None:
    """Gone, if it can be: a temporary file a failure left (on a full disk, the space it took)."""
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def write_lines(path: Path, lines: Iterable[bytes], *, suffix: str = "tmp") -> int:
    """Replace `path` whole or not at all with `lines`, streamed (a temporary file named for
    its writer, synced, then renamed); returns how many."""
    with staged(path, lines, suffix=suffix) as count:
        return count


@contextlib.contextmanager
def staged(path: Path, lines: Iterable[bytes], *, suffix: str = "tmp") -> Iterator[int]:
    """`write_lines`, with the rename held back until the block ends (and not done if it
    raises): files that must agree are replaced in the order that keeps them agreeing, should
    the process be killed between two renames."""
    tmp = path.with_name(f".{path.name}.{suffix}")
    count = 0
    try:
        with tmp.open("wb") as f:
            for line in lines:
                f.write(line)
                count += 1
            f.flush()
            os.fsync(f.fileno())
        yield count
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)  # a full disk keeps no half copy of a big file
        raise
    finally:
        # Lines read from an index (a cursor of the ledger) let go of it now: kept alive by
        # the error's traceback, an open cursor made closing the ledger leave its connection
        # open, holding its lock, and the next run in this process found "database is locked".
        close = getattr(lines, "close", None)
        if close is not None:
            close()


def aside(folder: Path) -> Path:
    """A new folder OUT/previous-<time>/ for what `--fresh` moves aside."""
    target = folder / time.strftime("previous-%Y%m%d-%H%M%S")
    n = 1
    while target.exists():
        n += 1
        target = folder / time.strftime(f"previous-%Y%m%d-%H%M%S-{n}")
    target.mkdir()
    return target


def move_aside(folder: Path) -> Path | None:
    """`--fresh`: keep the old run's files in OUT/previous-<time>/ instead of deleting them."""
    present = [name for name in OUR_FILES if (folder / name).exists()]
    if not present:
        return None
    target = aside(folder)
    for name in present:
        shutil.move(str(folder / name), str(target / name))
    return target


def take_lock(f: IO[Any], folder: Path) -> bool:
    """flock `f` (the folder's .lock) at once; False when another process holds it. A
    filesystem that gives no locks is refused (exit 2), naming it and what to use instead."""
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in NO_LOCKS:
            raise SettingsError(no_locks(folder, e)) from None
        raise
    return True


@contextlib.contextmanager
def lock_folder(folder: Path) -> Iterator[None]:
    """Hold the folder's lock. Failing to write the holder's name into it, or to let go of
    it, is no matter: the lock is the flock, which closing the file releases."""
    try:
        f = (folder / ".lock").open("a+")
    except OSError as e:
        raise stopped(folder, e) from None
    taken = False
    try:
        try:
            taken = take_lock(f, folder)
        except OSError as e:
            raise stopped(folder, e) from None
        if not taken:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise FolderBusy(
                f"another run is writing to {folder} ({holder}); wait for it or choose another --output"
            )
        with contextlib.suppress(OSError):
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()}")
            f.flush()
        yield
    finally:
        try:
            if taken:  # let go even if a forked child holds the file open too
                with contextlib.suppress(OSError):
                    fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        finally:
            with contextlib.suppress(OSError):
                f.close()


def stopped(folder: Path, error: OSError | sqlite3.Error) -> RunStopped:
    return RunStopped(unwritable(folder, error), code="output_unwritable")


@contextlib.contextmanager
def opened(
    folder: Path, fingerprint: dict[str, Any], *, fresh: bool = False, redo: bool = False
) -> Iterator[Ledger]:
    """The folder of a run: made, locked, its old files moved aside when `fresh`, its index
    opened for this job. A write that fails here or in the run inside (OSError, sqlite3.Error)
    is a stop naming the folder and its device; what a failure left half done in the index
    is dropped, never committed (a run commits what it keeps as it goes)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if is_full(e) or e.errno == errno.EIO:
            raise stopped(folder, e) from None
        raise SettingsError(f"cannot create the output folder {folder}: {e.strerror}") from None
    with lock_folder(folder):
        try:
            previous = move_aside(folder) if fresh else None
            ledger = open_job(folder, fingerprint, redo=redo)
            ledger.previous = previous
        except sqlite3.DatabaseError as e:
            if is_full(e) or "I/O" in str(e):
                raise stopped(folder, e) from None
            raise RunStopped(
                f"cannot open {folder / LEDGER} ({e}); is the folder writable? Moving the file aside "
                "rebuilds it from results.jsonl",
                code="output_unwritable",
            ) from None
        except (OSError, sqlite3.Error) as e:
            raise stopped(folder, e) from None
        try:
            yield ledger
        except (OSError, sqlite3.Error) as e:  # full, failing, read-only, gone
            raise stopped(folder, e) from None
        finally:
            with contextlib.suppress(sqlite3.Error):
                ledger.close(commit=False)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def differences(old: Any, new: Any, where: str = "") -> list[str]:
    """What changed from `old` to `new`, key by key into tables, each as one short phrase."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: list[str] = []
        for key in [*old, *(k for k in new if k not in old)]:
            found += differences(old.get(key), new.get(key), f"{where}.{key}" if where else str(key))
        return found
    if old == new:
        return []
    if old is None:
        return [f"{where} is new ({_shown(new)})"]
    if new is None:
        return [f"{where} is gone (was {_shown(old)})"]
    return [f"{where} was {_shown(old)}, now {_shown(new)}"]


def open_job(folder: Path, fingerprint: dict[str, Any], *, redo: bool = False) -> Ledger:
    """The folder's index, for this job: a folder that holds another job's outputs is refused,
    naming what differs, so that two jobs' results never mix. With `redo`, the request
    defaults may change (the same input and shard): `ledger.changes` says how, and the run
    records the new job with the lines it chose (`pipeline.output.redo`)."""
    ledger = Ledger(folder / LEDGER)
    try:
        recorded = ledger.get("job")
        if recorded is None:
            ledger.put("job", fingerprint)
            ledger.commit()
            return ledger
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            ledger.close(commit=False)
        raise
    if isinstance(recorded, dict) and isinstance(recorded.get("request"), dict):
        # Folders made before the model left `request` (it is the fingerprint's `model`).
        recorded["request"] = {k: v for k, v in recorded["request"].items() if k != "model"}
    if recorded != fingerprint:
        changed = differences(recorded, fingerprint)
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        fixed = isinstance(recorded, dict) and all(
            recorded.get(key) == fingerprint.get(key) for key in ("input", "shard")
        )
        if redo and fixed:
            ledger.changes = changed
            return ledger
        with contextlib.suppress(sqlite3.Error):
            ledger.close(commit=False)
        if redo:
            raise SettingsError(
                f"{folder} holds the outputs of another input ({shown}): --redo sends lines of the same "
                "input and shard again; run with --fresh to start over there, or choose another --output"
            )
        raise SettingsError(
            f"{folder} holds the outputs of a different job ({shown}); run with --redo WHAT to send "
            "again only the lines that need it (length, filter, invalid, failed, ids:FILE) under the new "
            "settings, --fresh to start over there (old files are moved aside), or choose another --output"
        )
    return ledger
