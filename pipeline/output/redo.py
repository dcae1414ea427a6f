"""`--redo WHAT`: the lines of a folder sent again, chosen at a run's start (issue 23, point 1).

    length      a result with a choice cut by max_tokens (finish_reason "length")
    filter      a result with a choice cut by the provider's filter ("content_filter")
    invalid     a result whose verdict fails the job's [verdict] now (a schema changed since),
                and the verdict failures errors.jsonl lists
    failed      every request failure errors.jsonl lists
    ids:FILE    the ids FILE lists, one a line (a JSON line with a custom_id will do)

A result chosen is committed to the ledger's `redo` table (its id, why, and where its line
is in results.jsonl) and taken out of `done`, in one commit, before anything is sent: the
reader sends it again, and its old line stays in results.jsonl until the new answer is
committed; then `pipeline.output.supersede` moves the old line to superseded.jsonl. A redo
that fails keeps the old answer, and its row, for a later run. Failures are sent again by
every run anyway: choosing them counts them, and lets the request defaults change for them.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from pipeline.errors import InvalidOutput, SettingsError

if TYPE_CHECKING:
    from pipeline.output.ledger import Ledger
    from pipeline.prices import Price
    from pipeline.send.verdict import Verdict

REASONS = ("length", "filter", "invalid", "failed")
FINISH = {"length": "length", "filter": "content_filter"}
TABLE = """CREATE TABLE IF NOT EXISTS redo (
    id TEXT PRIMARY KEY, reason TEXT, start INTEGER, length INTEGER, planned INTEGER DEFAULT 0
) WITHOUT ROWID"""
SHOWN_UNKNOWN = 3  # unknown ids named in the warning


@dataclass(frozen=True)
class Redo:
    """What `--redo` asks for: reasons, and the ids of a file."""

    what: str  # as given, for the record
    reasons: tuple[str, ...]
    ids_file: Path | None = None
    ids: frozenset[str] = frozenset()


def parse_redo(text: str) -> Redo:
    """`length,invalid,ids:FILE` as a `Redo`; a bad one is a one-line `SettingsError`."""
    reasons: list[str] = []
    ids_file: Path | None = None
    parts = text.split(",")
    for i, raw in enumerate(parts):
        part = raw.strip()
        if part.startswith("ids:"):
            name = ",".join([part, *parts[i + 1 :]])[4:].strip()  # (a file's name may hold commas)
            if not name:
                raise SettingsError("--redo ids:FILE needs a file: ids:redo.txt, one custom_id a line")
            ids_file = Path(name).expanduser()
            break
        if part not in REASONS:
            import difflib

            close = difflib.get_close_matches(part, [*REASONS, "ids:"], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SettingsError(
                f"--redo {text!r}: {part!r} is not one of length, filter, invalid, failed, ids:FILE{hint}"
            )
        if part not in reasons:
            reasons.append(part)
    ids = frozenset(read_ids(ids_file)) if ids_file is not None else frozenset()
    return Redo(text, tuple(reasons), ids_file, ids)


def read_ids(path: Path) -> list[str]:
    """The ids of an ids file: one a line, bare or as a JSON line with a custom_id (errors.jsonl's
    and results.jsonl's lines will do); blank lines skipped."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise SettingsError(f"--redo ids:{path}: cannot read it ({e.strerror or e})") from None
    ids: list[str] = []
    for number, raw in enumerate(data.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith(b"{"):
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                obj = None
            found = obj.get("custom_id") if isinstance(obj, dict) else None
            if not isinstance(found, str):
                raise SettingsError(
                    f"--redo ids:{path}:{number}: a JSON line without a custom_id; give one id a line"
                )
            ids.append(found)
            continue
        try:
            ids.append(line.decode())
        except UnicodeDecodeError:
            raise SettingsError(
                f"--redo ids:{path}:{number}: not UTF-8 text; give one custom_id a line"
            ) from None
    return ids


@dataclass
class Selection:
    """What a redo chose: results to send again (id, reason, start, length), failures counted."""

    rows: list[tuple[str, str, int, int]] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)  # every line chosen, by why
    superseded_cost: float = 0.0  # what the answers chosen had cost
    unpriced: int = 0  # of them, those whose cost is not known
    unknown: list[str] = field(default_factory=list)  # ids of the file the folder does not hold
    unknown_count: int = 0

    @property
    def lines(self) -> int:
        return sum(self.reasons.values())

    def record(self, started: str, changes: list[str]) -> dict[str, Any]:
        """The run's entry in usage's `redos`."""
        return {
            "started": started,
            "lines": self.lines,
            "reasons": dict(self.reasons),
            "superseded_cost": round(self.superseded_cost, 6),
            "unpriced": self.unpriced,
            "changes": changes,
            **({"unknown_ids": self.unknown_count} if self.unknown_count else {}),
        }

    def warning(self, redo: Redo) -> str | None:
        if not self.unknown_count:
            return None
        shown = ", ".join(self.unknown[:SHOWN_UNKNOWN]) + (
            ", ..." if self.unknown_count > SHOWN_UNKNOWN else ""
        )
        return (
            f"--redo ids:{redo.ids_file}: {self.unknown_count:,} id(s) are in no result or failure of "
            f"this folder ({shown}); they are not sent"
        )


def _why(obj: Mapping[str, Any], redo: Redo, verdict: Verdict | None) -> str | None:
    body = obj["response"]["body"]
    choices = body.get("choices") if isinstance(body, dict) else None
    finishes = (
        {c.get("finish_reason") for c in choices if isinstance(c, dict)}
        if isinstance(choices, list)
        else set()
    )
    for reason in redo.reasons:
        if reason in FINISH and FINISH[reason] in finishes:
            return reason
        if reason == "invalid" and verdict is not None:
            try:
                verdict.check(body)
            except InvalidOutput:
                return reason
    if obj["custom_id"] in redo.ids:
        return "ids"
    return None


def select(
    results: Path,
    end: int,
    redo: Redo,
    *,
    counted: Callable[[str], bool],
    failures: Iterable[tuple[str, str, bytes]],
    verdict: Verdict | None,
    prices: Mapping[str, Price],
    mine: Callable[[str], bool] | None = None,
) -> Selection:
    """The lines of `redo` in a folder: results.jsonl's up to `end` whose id `counted` (done,
    not waiting for a redo already), and the failures (key, kind, error line) it lists. `mine`:
    a shard's ids (the file's others are other shards', not unknown)."""
    from pipeline.account.cost import answer_cost
    from pipeline.output.repair import valid_result

    chosen = Selection()
    known: set[str] = set()
    cheap = not ("invalid" in redo.reasons and verdict is not None) and not redo.ids
    marks = [b'"' + FINISH[r].encode() + b'"' for r in redo.reasons if r in FINISH]
    if results.exists() and (marks or not cheap):
        with results.open("rb") as f:
            pos = 0
            for raw in f:
                start, pos = pos, pos + len(raw)
                if pos > end:
                    break
                if cheap and not any(m in raw for m in marks):
                    continue  # (no choice of this line can say it: not parsed)
                obj = valid_result(raw)
                if obj is None or not counted(obj["custom_id"]):
                    continue
                if obj["custom_id"] in redo.ids:  # (only those: a million ids held is 100 MB)
                    known.add(obj["custom_id"])
                reason = _why(obj, redo, verdict)
                if reason is None:
                    continue
                chosen.rows.append((obj["custom_id"], reason, start, len(raw)))
                chosen.reasons[reason] += 1
                cost, _ = (
                    answer_cost(obj["response"]["body"], prices, None) if not obj.get("reused") else (0.0, "")
                )
                if cost is None:
                    chosen.unpriced += 1
                else:
                    chosen.superseded_cost += cost
    for key, kind, record in failures:
        if kind != "request":
            continue
        if key in redo.ids:
            known.add(key)
        if "failed" in redo.reasons:
            chosen.reasons["failed"] += 1
        elif "invalid" in redo.reasons and b'"invalid_output"' in record:
            chosen.reasons["invalid"] += 1
        elif key in redo.ids:
            chosen.reasons["ids"] += 1
    if redo.ids:
        unknown = sorted(
            i for i in redo.ids - known - {row[0] for row in chosen.rows} if mine is None or mine(i)
        )
        chosen.unknown, chosen.unknown_count = unknown[:SHOWN_UNKNOWN], len(unknown)
    return chosen


def chosen_before(db: sqlite3.Connection) -> set[str]:
    """The ids an earlier redo chose whose older answer is still in results.jsonl."""
    try:
        return {row[0] for row in db.execute("SELECT id FROM redo")}
    except sqlite3.OperationalError:  # (a folder no redo has touched: no table)
        return set()


def waiting_count(db: sqlite3.Connection) -> int:
    try:
        row = db.execute("SELECT count(*) FROM redo WHERE id NOT IN (SELECT id FROM done)").fetchone()
    except sqlite3.OperationalError:
        return 0
    return int(row[0])


def failed_count(db: sqlite3.Connection) -> int:
    """Of the ids waiting for a redo, those whose request failed (errors.jsonl lists them)."""
    try:
        row = db.execute(
            "SELECT count(*) FROM failed WHERE kind = 'request' AND key IN "
            "(SELECT id FROM redo WHERE id NOT IN (SELECT id FROM done))"
        ).fetchone()
    except sqlite3.OperationalError:
        return 0
    return int(row[0])


def release_unread(ledger: Ledger) -> int:
    """Once the whole input was read: the ids a redo chose that no line brings any more (the
    input changed under its name) keep their earlier answer, done again, their redo dropped
    (else every run waits for them); how many. Committed by the caller."""
    db = ledger.writing()
    try:
        waiting = [row[0] for row in db.execute("SELECT id FROM redo WHERE id NOT IN (SELECT id FROM done)")]
    except sqlite3.OperationalError:  # (no redo ever: no table)
        return 0
    gone = ledger.unseen(waiting)
    if gone:
        db.executemany("DELETE FROM redo WHERE id = ?", zip(gone))
        ledger.add_done(gone)
    return len(gone)


def is_redone(db: sqlite3.Connection, custom_id: str) -> bool:
    """Whether a redo chose this id (its answer must be new: not the answer cache's)."""
    try:
        return db.execute("SELECT 1 FROM redo WHERE id = ?", (custom_id,)).fetchone() is not None
    except sqlite3.OperationalError:
        return False
