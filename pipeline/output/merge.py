"""`pipeline merge OUT`: join the shards' folders OUT/shard-K-of-N/ into OUT/, as one process
would have written it: results.jsonl (every shard's lines, copied as they are), errors.jsonl
(in input order), usage.json, report.md and report.html (the shards' totals added, every run
of every shard in the run list, every shard's timeline).

It streams (a million lines in flat memory), replaces each file whole or not at all, so it is
safe to run again, and refuses, naming them, missing, unfinished or mismatched shards, unless
told `partial` (then it joins what is there, and says what is not).
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from pipeline.account.usage import Usage
from pipeline.errors import SettingsError
from pipeline.output.folder import ERRORS, LEDGER, RESULTS, differences
from pipeline.output.ledger import Ledger
from pipeline.output.writer import Redactor
from pipeline.report.markdown import usage_document, write_reports

_SHARD = re.compile(r"shard-(\d+)-of-(\d+)")


@dataclass
class ShardFolder:
    path: Path
    k: int
    n: int
    job: dict[str, Any] | None = None
    usage: Usage = field(default_factory=Usage)
    problem: str | None = None  # why it cannot be merged as finished

    @property
    def name(self) -> str:
        return f"shard {self.k} of {self.n}"


@dataclass(frozen=True)
class Merged:
    folder: Path
    shards: int
    results: int
    errors: int
    pending: int
    missing: list[str]  # what a partial merge left out

    def __str__(self) -> str:
        return (
            f"Merged {self.shards} shard(s) into {self.folder}/: {self.results:,} results, {self.errors:,} "
            f"failures, {self.pending:,} pending (results.jsonl, errors.jsonl, usage.json, report.md, report.html)"
        )


def running(folder: Path) -> bool:
    """Whether a run holds the folder's lock now."""
    lock = folder / ".lock"
    if not lock.exists():
        return False
    with lock.open("a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return False


def _read_shard(path: Path, k: int, n: int) -> ShardFolder:
    shard = ShardFolder(path, k, n)
    if not (path / LEDGER).exists():
        shard.problem = "has no ledger.sqlite: it never ran"
        return shard
    ledger = Ledger(path / LEDGER)
    try:
        shard.job = ledger.get("job")
        shard.usage = Usage.from_state(ledger.get("usage"))
    finally:
        ledger.close()
    runs = shard.usage.runs
    last = runs[-1] if runs else None
    if running(path):
        shard.problem = "is running now"
    elif last is None:
        shard.problem = "has not finished a run (killed?): run it again to finish it"
    elif last.get("pending") != 0 or last.get("exit") not in (0, 1):
        pending = last.get("pending")
        left = f"{pending:,} lines pending" if isinstance(pending, int) else "lines pending"
        shard.problem = f"is unfinished ({left}, exit {last.get('exit')}): run it again to finish it"
    return shard


def shard_folders(out: Path) -> list[tuple[Path, int, int]]:
    """OUT/shard-K-of-N/ folders, with K and N."""
    found = []
    for entry in sorted(out.iterdir()):
        match = _SHARD.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((entry, int(match.group(1)), int(match.group(2))))
    return found


def find_shards(out: Path) -> list[ShardFolder]:
    if not out.is_dir():
        raise SettingsError(f"{out} is not a folder; pass the --output the shards ran with")
    found = [_read_shard(path, k, n) for path, k, n in shard_folders(out)]
    if not found:
        raise SettingsError(
            f"{out} holds no shard folders (shard-K-of-N/); run pipeline run --shard K/N first"
        )
    return found


def _check(shards: list[ShardFolder]) -> list[str]:
    """What stands in the way of a complete merge, one phrase each."""
    counts = sorted({s.n for s in shards})
    if len(counts) > 1:
        raise SettingsError(
            "the shard folders are of different splits ("
            + ", ".join(f"of {n}" for n in counts)
            + "): merge one split, and move the other folders aside"
        )
    n = counts[0]
    problems = [f"shard {k} of {n} is missing" for k in range(1, n + 1) if k not in {s.k for s in shards}]
    problems += [f"{s.name} {s.problem}" for s in shards if s.problem]
    jobs = [(s, {k: v for k, v in (s.job or {}).items() if k != "shard"}) for s in shards if s.job]
    for shard, job in jobs[1:]:
        changed = differences(jobs[0][1], job)
        if changed:
            raise SettingsError(
                f"{shard.name} ran another job than {jobs[0][0].name} ({'; '.join(changed[:3])}): "
                "its folder belongs to another run"
            )
    return problems


def _whole_lines(f: BinaryIO) -> Iterator[bytes]:
    """The file's lines that end in a newline: a torn last line (a killed shard) is left out."""
    for line in f:
        if line.endswith(b"\n"):
            yield line


def _line_number(record: bytes) -> int:
    try:
        line = orjson.loads(record).get("line")
    except (orjson.JSONDecodeError, AttributeError):
        return 0
    return line if isinstance(line, int) else 0


def _replace(path: Path, lines: Iterator[bytes]) -> int:
    """Write the lines to `path` whole or not at all; returns how many."""
    tmp = path.with_name(f".{path.name}.merge")
    count = 0
    with tmp.open("wb") as out:
        for line in lines:
            out.write(line)
            count += 1
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return count


def added(shards: list[ShardFolder]) -> tuple[Usage, int, int | None]:
    """The shards' usage added up (every run labelled by its shard, in the order they
    started), the lines they left pending, and the input's lines."""
    usage = Usage()
    for shard in shards:
        usage.add(shard.usage, label=f"{shard.k}/{shard.n}")
    usage.runs.sort(key=lambda r: str(r.get("started", "")))
    lasts = [s.usage.runs[-1] for s in shards if s.usage.runs]
    pending = sum(int(last.get("pending") or 0) for last in lasts)
    lines = max((last.get("lines") or 0 for last in lasts), default=0) or None
    return usage, pending, lines


def merge(out: Path, *, partial: bool = False) -> Merged:
    shards = find_shards(out)
    problems = _check(shards)
    if problems and not partial:
        raise SettingsError(
            f"cannot merge {out}: " + "; ".join(problems) + " (or merge what is there with --partial)"
        )
    shards = [s for s in shards if s.job is not None]
    with contextlib.ExitStack() as files:
        opened = [
            files.enter_context((s.path / RESULTS).open("rb")) for s in shards if (s.path / RESULTS).exists()
        ]

        def results() -> Iterator[bytes]:
            for f in opened:
                yield from _whole_lines(f)

        results_count = _replace(out / RESULTS, results())
    with contextlib.ExitStack() as files:
        streams = [
            (
                (_line_number(line), line)
                for line in _whole_lines(files.enter_context((s.path / ERRORS).open("rb")))
            )
            for s in shards
            if (s.path / ERRORS).exists()
        ]
        errors_count = _replace(out / ERRORS, (line for _, line in heapq.merge(*streams, key=lambda t: t[0])))
    usage, pending, lines = added(shards)
    state = {"succeeded": results_count, "failed": errors_count, "pending": pending, "lines": lines}
    write_reports(out, usage_document(usage, state=state, folder=out), Redactor(None))
    return Merged(out, len(shards), results_count, errors_count, pending, problems)
