"""`pipeline merge OUT`: join the shards' folders OUT/shard-K-of-N/ into OUT/, as one process
would have written it: results.jsonl (every shard's results, each id once), errors.jsonl (what
each shard's ledger lists as failed now, in input order, never an id that is a result),
usage.json, report.md and report.html (the shards' totals added, every run of every shard in
the run list, every shard's timeline).

It streams (a million lines in flat memory: the ids it has written are kept in a temporary
SQLite file, see `ids`), replaces each file whole or not at all, so it is safe to run again,
and refuses, naming them, missing, unfinished or mismatched shards, unless told `partial`
(then it joins what is there, and says what is not). A shard whose last run was killed is
first repaired as its next run would repair it (see `shards`). Should it still find an id
twice, it keeps one and says how many it dropped: that is a bug elsewhere, worth reporting.

    OUT/.merge.lock         held while a merge works: a second merge waits for it
    OUT/.lock               a run's lock, held too: no run writes into OUT mid-merge
    OUT/shard-K-of-N/.lock  each shard's run lock, held: a shard running now is refused, and
                            no run starts into one mid-merge
    OUT/.merge-ids.sqlite   the ids merged so far, removed at the end
"""

from __future__ import annotations

import contextlib
import fcntl
import heapq
import os
import socket
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import orjson

from pipeline.batch.tally import shards_figures
from pipeline.errors import FolderBusy, RunStopped, SettingsError
from pipeline.output.device import unwritable
from pipeline.output.folder import (
    ERRORS,
    LEDGER,
    RESULTS,
    differences,
    lock_folder,
    staged,
    take_lock,
    write_lines,
)
from pipeline.output.ids import IdIndex
from pipeline.output.ledger import Ledger
from pipeline.output.shards import RUNNING, ShardFolder, added, read_shard, repair_shard, shard_folders
from pipeline.output.writer import Redactor
from pipeline.report.markdown import usage_document, write_reports

MERGE_LOCK = ".merge.lock"
INDEX = ".merge-ids.sqlite"


@dataclass(frozen=True)
class Merged:
    folder: Path
    shards: int
    results: int
    errors: int
    pending: int | None  # None: not known (a partial merge without some shard)
    missing: list[str]  # what a partial merge left out
    repaired: list[str] = field(default_factory=list)  # shards a killed run left, repaired first
    dropped: dict[str, int] = field(default_factory=dict)  # lines left out, by why

    def __str__(self) -> str:
        line = (
            f"Merged {self.shards} shard(s) into {self.folder}/: {self.results:,} results, {self.errors:,} "
            f"failures, {'an unknown number' if self.pending is None else f'{self.pending:,}'} pending "
            "(results.jsonl, errors.jsonl, usage.json, report.md, report.html)"
        )
        if self.dropped:
            why = ", ".join(f"{reason}: {n:,}" for reason, n in self.dropped.items())
            line += f"; left out {sum(self.dropped.values()):,} line(s) of ids merged already ({why}): a bug worth reporting"
        return "\n".join([*(f"pipeline merge: {note}" for note in self.repaired), line])


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _holder(lock: Path) -> str:
    with contextlib.suppress(OSError):
        return lock.read_text().strip() or "another process"
    return "another process"


@contextlib.contextmanager
def merging(out: Path, say: Callable[[str], None] = _say) -> Iterator[None]:
    """OUT's merge lock (another merge's is waited for) and its run lock (a run holding it is
    refused): each merge alone in OUT, with its temporary files, and no run writing there."""
    with (out / MERGE_LOCK).open("a+") as f:
        if not take_lock(f, out):
            say(f"pipeline merge: waiting for another merge of {out} ({_holder(out / MERGE_LOCK)}) to end")
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)  # a merge takes seconds to minutes: wait
        f.seek(0)
        f.truncate()
        f.write(f"pipeline merge, pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            with contextlib.ExitStack() as run_lock:
                try:
                    run_lock.enter_context(lock_folder(out))
                except FolderBusy:
                    raise SettingsError(
                        f"cannot merge {out}: a run is writing into {out} itself now "
                        f"({_holder(out / '.lock')}); wait for it to end, or merge the shards elsewhere"
                    ) from None
                yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _hold(held: contextlib.ExitStack, path: Path, k: int, n: int) -> ShardFolder:
    """The shard under its lock, kept until the merge ends; one a run holds is left as it is."""
    try:
        held.enter_context(lock_folder(path))
    except FolderBusy:
        return read_shard(path, k, n, busy=True)
    return read_shard(path, k, n, busy=False)


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


def _custom_id(line: bytes) -> str | None:
    try:
        custom_id = orjson.loads(line).get("custom_id")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return custom_id if isinstance(custom_id, str) else None


def _results(shards: list[ShardFolder], index: IdIndex, dropped: Counter[str]) -> Iterator[bytes]:
    """Every shard's result lines, the first of each id only."""
    for shard in shards:
        if not (shard.path / RESULTS).exists():
            continue
        with (shard.path / RESULTS).open("rb") as f:
            for line in _whole_lines(f):
                custom_id = _custom_id(line)
                if custom_id is None or index.first_result(custom_id):
                    yield line
                else:
                    dropped["results twice"] += 1


def _errors(shards: list[ShardFolder], index: IdIndex, dropped: Counter[str]) -> Iterator[bytes]:
    """What each shard's ledger lists as failed now, in input order: a failure whose id is a
    result is left out (the result wins), and so is a second failure of one key."""
    with contextlib.ExitStack() as opened:
        ledgers = [opened.enter_context(contextlib.closing(Ledger(s.path / LEDGER))) for s in shards]
        for _line, key, kind, record in heapq.merge(*(ledger.failures() for ledger in ledgers)):
            if kind == "request" and index.has_result(key):
                dropped["failures of ids that are results"] += 1
            elif not index.first_failure(key):
                dropped["failures twice"] += 1
            else:
                yield record


def merge(out: Path, *, partial: bool = False, say: Callable[[str], None] = _say) -> Merged:
    if not out.is_dir():
        raise SettingsError(f"{out} is not a folder; pass the --output the shards ran with")
    with merging(out, say), contextlib.ExitStack() as held:
        if (out / LEDGER).exists():
            raise SettingsError(
                f"cannot merge into {out}: it holds the files of a run that was not sharded "
                f"({LEDGER}, {RESULTS}), which a merge would replace; move them aside first"
            )
        found = shard_folders(out)
        if not found:
            raise SettingsError(
                f"{out} holds no shard folders (shard-K-of-N/); run pipeline run --shard K/N first"
            )
        shards = [_hold(held, path, k, n) for path, k, n in found]
        problems = _check(shards)
        if problems and not partial:
            raise SettingsError(
                f"cannot merge {out}: " + "; ".join(problems) + " (or merge what is there with --partial)"
            )
        shards = [s for s in shards if s.job is not None and s.problem != RUNNING]
        repaired = [repair_shard(s) for s in shards if s.killed]
        dropped: Counter[str] = Counter()
        index = IdIndex(out / INDEX)
        try:
            # errors.jsonl is replaced first: killed between the two renames, OUT holds the
            # earlier results with the new errors, never an error for an id the earlier results
            # hold (a result is never undone); the other order left the new results beside the
            # earlier errors, ids both (the kill bench's merge kills found 36).
            with staged(out / RESULTS, _results(shards, index, dropped), suffix="merge") as results:
                errors = write_lines(out / ERRORS, _errors(shards, index, dropped), suffix="merge")
        finally:
            index.close()
        usage, pending, lines = added(shards)
        state = {"succeeded": results, "failed": errors, "pending": pending, "lines": lines}
        batches = shards_figures([s.path for s in shards], refused=usage.answers.get("refused", 0))
        doc = usage_document(
            usage, state=state, folder=out, batches=batches, held=sum(s.held for s in shards)
        )
        write_reports(out, doc, Redactor(None))
    return Merged(out, len(shards), results, errors, pending, problems, repaired, dict(dropped))


def merge_or_stop(out: Path, *, partial: bool = False, say: Callable[[str], None] = _say) -> Merged:
    """`merge`, with a folder that cannot be written said as a stop (`RunStopped`, exit 3:
    merge again once it can). (One whose filesystem gives no locks is refused as the locks are
    taken, `folder.take_lock`: exit 2.)"""
    try:
        return merge(out, partial=partial, say=say)
    except (OSError, sqlite3.Error) as e:  # each file is replaced whole: nothing half written
        raise RunStopped(unwritable(out, e, again="to merge"), code="output_unwritable") from None
