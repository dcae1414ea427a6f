"""A set of shards as a merge (or `pipeline report`) finds them: OUT/shard-K-of-N/ folders,
what each holds, whether it can be merged as finished, and whether its last run was killed.

A folder a killed run left is known by its ledger (`open_run` set: a run began and wrote no
end record) or, in folders made before runs said so, by results.jsonl being longer than its
index (`results_offset`) or errors.jsonl not being what the ledger lists. Under the shard's
lock, `repair` makes it what the next run would have made of it at its start.
"""

from __future__ import annotations

import fcntl
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.account.books import Books
from pipeline.account.usage import Usage
from pipeline.errors import SettingsError
from pipeline.output.folder import ERRORS, LEDGER, RESULTS, take_lock
from pipeline.output.ledger import OPEN_RUN, Ledger
from pipeline.output.repair import mark_prices, repair
from pipeline.output.supersede import PLAN, owed

_SHARD = re.compile(r"shard-(\d+)-of-(\d+)")
RUNNING = "is running now"


@dataclass
class ShardFolder:
    path: Path
    k: int
    n: int
    job: dict[str, Any] | None = None
    usage: Usage = field(default_factory=Usage)
    problem: str | None = None  # why it cannot be merged as finished
    killed: str | None = None  # how its last run was found not to have ended, when it was

    @property
    def name(self) -> str:
        return f"shard {self.k} of {self.n}"

    def again(self) -> str:
        """The command that finishes it."""
        return (
            f"run `pipeline run JOB --shard {self.k}/{self.n} --output {self.path.parent}` again "
            "(or the `pipeline ray` command that made it) to finish it"
        )


def running(folder: Path) -> bool:
    """Whether a run holds the folder's lock now."""
    lock = folder / ".lock"
    if not lock.exists():
        return False
    with lock.open("a+") as f:
        if not take_lock(f, folder):
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    return False


def shard_folders(out: Path) -> list[tuple[Path, int, int]]:
    """OUT/shard-K-of-N/ folders, with K and N."""
    found = []
    for entry in sorted(out.iterdir()):
        match = _SHARD.fullmatch(entry.name)
        if match and entry.is_dir():
            found.append((entry, int(match.group(1)), int(match.group(2))))
    return found


def lines_in(path: Path) -> tuple[int, bool]:
    """How many lines a file holds (none: no file), and whether its last one is whole."""
    count, last = 0, b"\n"
    if not path.exists():
        return count, True
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count, last == b"\n"


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _killed(path: Path, ledger: Ledger) -> str | None:
    """How the folder shows that its last run did not end, if it does."""
    mark = ledger.get(OPEN_RUN)
    if isinstance(mark, dict):
        return f"its last run, started {mark.get('started')} by {mark.get('by')}, did not end (killed?)"
    if owed(ledger):
        return "its results.jsonl still holds the older answers of redone lines (a run stopped?)"
    offset = int(ledger.get("results_offset") or 0)
    size = _size(path / RESULTS)
    if size > offset:
        return f"its results.jsonl is {size:,} bytes where its index ends at {offset:,} (a run killed?)"
    lines, whole = lines_in(path / ERRORS)
    if (lines, whole) != (ledger.failed_count, True):
        return (
            f"its errors.jsonl holds {lines:,} lines{'' if whole else ' and a torn one'} where its "
            f"ledger lists {ledger.failed_count:,} failures (a run killed?)"
        )
    return None


def read_shard(path: Path, k: int, n: int, *, busy: bool | None = None) -> ShardFolder:
    """What the folder holds and what stands in its way; `busy`: whether a run holds its lock,
    when the caller knows (else it is looked at)."""
    shard = ShardFolder(path, k, n)
    if not (path / LEDGER).exists():
        if (path / RESULTS).exists() or (path / ERRORS).exists():
            # Moved or deleted: a run rebuilds it from results.jsonl (and tries again the lines
            # that had failed, which only the ledger listed).
            results, _ = lines_in(path / RESULTS)
            shard.problem = (
                f"has lost its ledger.sqlite (results.jsonl holds {results:,} lines): {shard.again()}"
            )
        else:
            shard.problem = f"has no ledger.sqlite: it never ran; {shard.again()}"
        return shard
    ledger = Ledger(path / LEDGER)
    try:
        shard.job = ledger.get("job")
        shard.usage = Usage.from_state(ledger.get("usage"))
        busy = running(path) if busy is None else busy
        if not busy:
            shard.killed = _killed(path, ledger)
        offset = int(ledger.get("results_offset") or 0)
        planned = ledger.get(PLAN) is not None  # (a compaction killed after its rename: shorter)
    finally:
        ledger.close()
    runs = shard.usage.runs
    last = runs[-1] if runs else None
    if busy:
        shard.problem = RUNNING
    elif last is None:
        shard.problem = f"has not finished a run: {shard.killed or 'killed?'}; {shard.again()}"
    elif last.get("pending") != 0 or last.get("exit") not in (0, 1):
        pending = last.get("pending")
        left = f"{pending:,} lines pending" if isinstance(pending, int) else "lines pending"
        shard.problem = f"is unfinished ({left}, exit {last.get('exit')}): {shard.again()}"
    elif _size(path / RESULTS) < offset and not planned:
        # Cut by someone: a repair would forget the results gone, and the lines they answered
        # would be neither results nor failures. A run sends them again.
        shard.problem = (
            f"has a results.jsonl shorter than its index ({_size(path / RESULTS):,} bytes, indexed "
            f"to {offset:,}): results it held are gone; {shard.again()}"
        )
    return shard


def repair_shard(shard: ShardFolder) -> str:
    """`repair.repair` on a shard whose last run was killed (the caller holds its lock);
    returns what was done, in a phrase."""
    ledger = Ledger(shard.path / LEDGER)
    try:
        usage = Usage.from_state(ledger.get("usage"))
        indexed, cut, listed = repair(shard.path, ledger, Books(usage, mark_prices(ledger.get(OPEN_RUN))))
    finally:
        ledger.close()
    shard.usage = usage
    done = [f"{indexed:,} results it wrote indexed"] if indexed else []
    done += [f"{cut:,} torn or duplicate lines cut"] if cut else []
    done.append(f"errors.jsonl rewritten ({listed:,} failures listed now)")
    return f"{shard.name}: {shard.killed}; repaired as a run would at its start: {', '.join(done)}"


def find_shards(out: Path) -> list[ShardFolder]:
    if not out.is_dir():
        raise SettingsError(f"{out} is not a folder; pass the --output the shards ran with")
    found = [read_shard(path, k, n) for path, k, n in shard_folders(out)]
    if not found:
        raise SettingsError(
            f"{out} holds no shard folders (shard-K-of-N/); run pipeline run --shard K/N first"
        )
    return found


def added(shards: list[ShardFolder]) -> tuple[Usage, int | None, int | None]:
    """The shards' usage added up (every run labelled by its shard, in the order they
    started), the lines they left pending, and the input's lines. Pending is not known (None)
    when a shard is not among them or never finished a run (a partial merge): 0 would say
    the job is done."""
    usage = Usage()
    for shard in shards:
        usage.add(shard.usage, label=f"{shard.k}/{shard.n}")
    usage.runs.sort(key=lambda r: str(r.get("started", "")))
    lasts = {s.k: s.usage.runs[-1] for s in shards if s.usage.runs}
    left = [n for last in lasts.values() if isinstance(n := last.get("pending"), int)]
    every = bool(shards) and set(lasts) == set(range(1, shards[0].n + 1)) and len(left) == len(lasts)
    pending = sum(left) if every else None
    lines = max((last.get("lines") or 0 for last in lasts.values()), default=0) or None
    return usage, pending, lines
