"""The older answers of redone lines moved out of results.jsonl into superseded.jsonl, once the
newer answers are committed (`pipeline.output.redo` chose them), so that results.jsonl holds
one line per id again; paid for, the older lines are kept, never lost.

    OUT/superseded.jsonl    every answer a redo replaced, each once, as it stood in results.jsonl

At a run's end, and in the repair of a killed run (before its index is brought up to the
file, since a compaction leaves the file shorter than the index said). Each step may be
killed and done again:

    1. plan      the rows to move marked `planned`, with superseded.jsonl's and results.jsonl's
                 sizes, in the ledger's meta (`supersede`), committed
    2. append    superseded.jsonl cut back to its planned size, the old lines appended, synced
    3. rewrite   results.jsonl without them (a synced copy, renamed over it): now shorter than
                 planned, which is how a repair knows step 3 was done
    4. commit    the rows gone, the plan cleared, `results_offset` the new size
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import sqlite3
from pathlib import Path
from typing import BinaryIO

from pipeline.output.folder import RESULTS
from pipeline.output.ledger import Ledger
from pipeline.output.redo import TABLE
from pipeline.output.repair import cut_ranges, valid_result

SUPERSEDED = "superseded.jsonl"
PLAN = "supersede"  # meta: the compaction under way: {"superseded": bytes, "results": bytes}


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _owed(db: sqlite3.Connection) -> list[tuple[str, int, int]]:
    try:
        rows = db.execute(
            "SELECT id, start, length FROM redo WHERE id IN (SELECT id FROM done) ORDER BY start"
        ).fetchall()
    except sqlite3.OperationalError:  # (no redo ever: no table)
        return []
    return [(str(i), int(s), int(n)) for i, s, n in rows]


def _line_of(f: BinaryIO, custom_id: str, start: int, length: int) -> bytes | None:
    """The old line where the row says, if it is that id's whole line."""
    f.seek(start)
    raw = f.read(length)
    obj = valid_result(raw) if len(raw) == length else None
    return raw if obj is not None and obj["custom_id"] == custom_id else None


def owed(ledger: Ledger) -> bool:
    """Whether older answers wait to be moved out (a compaction planned, or not begun)."""
    return ledger.get(PLAN) is not None or bool(_owed(ledger.reading()))


def old_lines(folder: Path, ledger: Ledger) -> int:
    """The older answers of redone lines results.jsonl holds now (not moved yet): lines of the
    file beside the index's ids."""
    db = ledger.reading()
    try:
        rows = db.execute("SELECT planned, count(*) FROM redo GROUP BY planned").fetchall()
    except sqlite3.OperationalError:
        return 0
    counts = {int(planned): int(n) for planned, n in rows}
    plan = ledger.get(PLAN)
    rewritten = isinstance(plan, dict) and _size(folder / RESULTS) < int(plan["results"])
    return counts.get(0, 0) + (0 if rewritten else counts.get(1, 0))


def locate(results: Path, ids: set[str]) -> dict[str, tuple[int, int]]:
    """Where the older line of each id is: its first of two or more (one alone is its answer)."""
    first: dict[str, tuple[int, int]] = {}
    again: set[str] = set()
    few = [i.encode() for i in ids] if len(ids) <= 8 else None  # (else every line is parsed)
    with results.open("rb") as f:
        pos = 0
        for raw in f:
            start, pos = pos, pos + len(raw)
            obj = valid_result(raw) if few is None or any(i in raw for i in few) else None
            if obj is None or obj["custom_id"] not in ids:
                continue
            if obj["custom_id"] in first:
                again.add(obj["custom_id"])
            else:
                first[obj["custom_id"]] = (start, len(raw))
    return {i: where for i, where in first.items() if i in again}


def compact(folder: Path, ledger: Ledger) -> int:
    """Move the old lines of redone ids that have their new answer (steps 1 to 4); returns
    how many. The caller has the index up to the file (results_offset its size)."""
    results = folder / RESULTS
    try:
        return _compact(folder, ledger, results)
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            ledger.rollback()
        raise


def _compact(folder: Path, ledger: Ledger, results: Path) -> int:
    db = ledger.writing()
    if ledger.get(PLAN) is not None:
        resume(folder, ledger)
    owed = _owed(db)
    if not owed:
        return 0
    size = _size(results)
    if size != int(ledger.get("results_offset") or 0):
        return 0  # the index is behind the file: the next run's repair moves them
    db.execute(TABLE)
    with results.open("rb") as f:
        bad = {row[0] for row in owed if _line_of(f, *row) is None}
    if bad:  # not where the row says (never so, but for a file rebuilt): looked for
        found = locate(results, bad)
        db.executemany("UPDATE redo SET start = ?, length = ? WHERE id = ?", ((*found[i], i) for i in found))
        db.executemany("DELETE FROM redo WHERE id = ?", ((i,) for i in bad - found.keys()))
    db.execute("UPDATE redo SET planned = 1 WHERE id IN (SELECT id FROM done)")
    ledger.put(PLAN, {"superseded": _size(folder / SUPERSEDED), "results": size})
    ledger.commit()
    return resume(folder, ledger)


def supersede_older(folder: Path, ledger: Ledger, ids: set[str]) -> set[str]:
    """The first line of each id that results.jsonl holds more than once moved out, as a redo's
    older answer is (the index that knew of the redo lost): returns the ids still held twice."""
    where = locate(folder / RESULTS, ids)
    if not where:
        return set()
    db = ledger.writing()
    db.execute(TABLE)
    db.executemany(
        "INSERT OR REPLACE INTO redo (id, reason, start, length) VALUES (?, 'rebuilt', ?, ?)",
        ((i, start, length) for i, (start, length) in where.items()),
    )
    ledger.commit()
    return set(where) if compact(folder, ledger) else set()


def resume(folder: Path, ledger: Ledger) -> int:
    """Steps 2 to 4 of the compaction the ledger plans, where one is planned (none: 0)."""
    plan = ledger.get(PLAN)
    if not isinstance(plan, dict):
        return 0
    db = ledger.writing()
    rows = [
        (str(i), int(s), int(n))
        for i, s, n in db.execute("SELECT id, start, length FROM redo WHERE planned = 1 ORDER BY start")
    ]
    results = folder / RESULTS
    if rows and _size(results) >= int(plan["results"]):  # not rewritten yet
        superseded = folder / SUPERSEDED
        moved: list[tuple[int, int]] = []
        fd = os.open(superseded, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, int(plan["superseded"]))  # (what a killed step 2 appended, taken back)
            os.lseek(fd, 0, os.SEEK_END)
            with results.open("rb") as f:
                for row in rows:
                    line = _line_of(f, *row)
                    if line is None:
                        continue  # (checked when planned: never, but no line is cut unkept)
                    view = memoryview(line)
                    while view:
                        view = view[os.write(fd, view) :]
                    moved.append((row[1], row[1] + row[2]))
            os.fsync(fd)
        finally:
            os.close(fd)
        if moved:
            cut_ranges(results, moved)
    # The lines left behind moved up by what was cut before each (ids still waiting).
    waiting = db.execute("SELECT id, start FROM redo WHERE planned = 0").fetchall()
    starts = [start for _, start, _ in rows]  # (in order)
    before = list(itertools.accumulate((length for _, _, length in rows), initial=0))
    db.executemany(
        "UPDATE redo SET start = ? WHERE id = ?",
        ((start - before[bisect.bisect_left(starts, start)], i) for i, start in waiting),
    )
    db.execute("DELETE FROM redo WHERE planned = 1")
    ledger.put("results_offset", _size(results))
    ledger.put(PLAN, None)
    ledger.commit()
    return len(rows)
