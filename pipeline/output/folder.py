"""The output folder as a whole, before and around a run: its lock, `--fresh`, the job it
holds (a different job is refused, naming what differs), and the repair after a crash.

    OUT/.lock           held while a run writes here; a second run into the folder is refused
    OUT/previous-<time> where `--fresh` moves an earlier run's files
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import os
import shutil
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import orjson

from pipeline.account.books import Books
from pipeline.errors import FolderBusy, RunStopped, SettingsError
from pipeline.output.device import NO_LOCKS, is_full, no_locks, unwritable
from pipeline.output.ledger import OPEN_RUN, Ledger
from pipeline.settings import Price

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
)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` whole or not at all: a temporary file, synced, then renamed."""
    write_lines(path, [data])


def _remove(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink(missing_ok=True)


def write_lines(path: Path, lines: Iterable[bytes], *, suffix: str = "tmp") -> int:
    """Replace `path` whole or not at all with `lines`, streamed (a temporary file named for
    its writer, synced, then renamed); returns how many."""
    tmp = path.with_name(f".{path.name}.{suffix}")
    count = 0
    try:
        with tmp.open("wb") as f:
            for line in lines:
                f.write(line)
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)  # a full disk keeps no half copy of a big file
        raise
    return count


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
def opened(folder: Path, fingerprint: dict[str, Any], *, fresh: bool = False) -> Iterator[Ledger]:
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
            if fresh:
                move_aside(folder)
            ledger = open_job(folder, fingerprint)
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


def _valid_result(raw: bytes) -> dict[str, Any] | None:
    """A whole, well-formed result line, parsed; None for anything torn."""
    if not raw.endswith(b"\n"):
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
        return None
    response = obj.get("response")
    if not isinstance(response, dict) or not isinstance(response.get("body"), dict):
        return None
    return obj


def reconcile(folder: Path, ledger: Ledger, books: Books) -> tuple[int, int]:
    """Bring the index up to results.jsonl after any crash: index the lines it has not seen,
    and cut out torn or duplicate lines. Returns (lines indexed, lines removed). All of it is
    committed at once or none of it: indexed ids without the offset that covers their lines
    would make the next repair cut those lines as copies."""
    try:
        return _reconcile(folder, ledger, books)
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            ledger.rollback()
        raise


def _reconcile(folder: Path, ledger: Ledger, books: Books) -> tuple[int, int]:
    path = folder / RESULTS
    offset = int(ledger.get("results_offset") or 0)
    size = path.stat().st_size if path.exists() else 0
    rebuild = size < offset or (offset == 0 and ledger.done_count > 0)
    if rebuild:
        # The file is shorter than what the index covers: rebuild the index from it.
        ledger.clear_done()
        books.usage.models.clear()
        offset = 0
    indexed = 0
    bad: list[tuple[int, int]] = []
    if size > offset:
        with path.open("rb") as f:
            f.seek(offset)
            pos = offset
            for raw in f:
                start, pos = pos, pos + len(raw)
                obj = _valid_result(raw)
                if obj is None or not ledger.add_done([obj["custom_id"]]):
                    bad.append((start, pos))
                    continue
                indexed += 1
                ledger.drop_failed([obj["custom_id"]])
                books.recovered(obj["response"]["body"], count_outcome=not rebuild)
    if bad:
        _cut(path, bad)
    ledger.put("results_offset", path.stat().st_size if path.exists() else 0)
    ledger.put("usage", books.usage.state())
    ledger.commit()
    return indexed, len(bad)


def open_run_mark(started: float, prices: Mapping[str, Price]) -> dict[str, Any]:
    """What the ledger's `open_run` holds while a run goes: when and where it began, and the
    prices it costs answers by (a repair after it is killed costs the answers it finds alike)."""
    return {
        "started": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
        "by": f"pid {os.getpid()} on {socket.gethostname()}",
        "prices": {model: [price.prompt, price.completion] for model, price in prices.items()},
    }


def repair(folder: Path, ledger: Ledger, books: Books) -> tuple[int, int, int]:
    """The repair a run makes at its start, for a folder whose last run was killed: results the
    index has not seen are indexed, torn or duplicate lines cut, and errors.jsonl rewritten
    from the ledger (what is failed now: a killed run had rewritten it, then appended). The
    run is no longer open. Returns (lines indexed, lines cut, failures listed)."""
    indexed, cut = reconcile(folder, ledger, books)
    listed = write_lines(folder / ERRORS, (record for _, _, record in ledger.failures()), suffix="repair")
    ledger.put(OPEN_RUN, None)
    ledger.commit()
    return indexed, cut, listed


def mark_prices(mark: Any) -> dict[str, Price]:
    """The prices an `open_run` mark holds (none in a mark that holds none)."""
    prices = mark.get("prices") if isinstance(mark, dict) else None
    if not isinstance(prices, dict):
        return {}
    return {
        model: Price(*pair) for model, pair in prices.items() if isinstance(pair, list) and len(pair) == 2
    }


def _cut(path: Path, bad: list[tuple[int, int]]) -> None:
    """Remove the byte ranges `bad` from the file, so that a crash at any moment leaves
    either the old file or the new one, never a file missing good lines."""
    size = path.stat().st_size
    if len(bad) == 1 and bad[0][1] == size:
        # Only the last line is bad (a torn write): one truncate, nothing else moves.
        with path.open("r+b") as f:
            f.truncate(bad[0][0])
            os.fsync(f.fileno())
        return
    tmp = path.with_name(f".{path.name}.repair")
    try:
        with path.open("rb") as src, tmp.open("wb") as dst:
            pos = 0
            for start, end in [*bad, (size, size)]:
                remaining = start - pos
                while remaining > 0:
                    block = src.read(min(remaining, 1 << 20))
                    dst.write(block)
                    remaining -= len(block)
                src.seek(end)
                pos = end
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


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


def open_job(folder: Path, fingerprint: dict[str, Any]) -> Ledger:
    """The folder's index, for this job: a folder that holds another job's outputs is refused,
    naming what differs, so that two jobs' results never mix."""
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
        with contextlib.suppress(sqlite3.Error):
            ledger.close(commit=False)
        changed = differences(recorded, fingerprint)
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise SettingsError(
            f"{folder} holds the outputs of a different job ({shown}); run with --fresh to start "
            "over there (old files are moved aside), or choose another --output"
        )
    return ledger
