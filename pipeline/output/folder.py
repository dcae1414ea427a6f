"""The output folder as a whole, before and around a run: its lock, `--fresh`, the job it
holds (a different job is refused, naming what differs), and the repair after a crash.

    OUT/.lock           held while a run writes here; a second run into the folder is refused
    OUT/previous-<time> where `--fresh` moves an earlier run's files
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
import shutil
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from pipeline.account.books import Books
from pipeline.errors import FolderBusy, SettingsError
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
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
        with contextlib.suppress(OSError):
            tmp.unlink()  # a full disk keeps no half copy of a big file
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


@contextlib.contextmanager
def lock_folder(folder: Path) -> Iterator[None]:
    with (folder / ".lock").open("a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise FolderBusy(
                f"another run is writing to {folder} ({holder}); wait for it or choose another --output"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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
    and cut out torn or duplicate lines. Returns (lines indexed, lines removed)."""
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
    listed = write_lines(folder / ERRORS, ledger.failures(), suffix="repair")
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
    recorded = ledger.get("job")
    if isinstance(recorded, dict) and isinstance(recorded.get("request"), dict):
        # Folders made before the model left `request` (it is the fingerprint's `model`).
        recorded["request"] = {k: v for k, v in recorded["request"].items() if k != "model"}
    if recorded is None:
        ledger.put("job", fingerprint)
        ledger.commit()
    elif recorded != fingerprint:
        ledger.close()
        changed = differences(recorded, fingerprint)
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise SettingsError(
            f"{folder} holds the outputs of a different job ({shown}); run with --fresh to start "
            "over there (old files are moved aside), or choose another --output"
        )
    return ledger
