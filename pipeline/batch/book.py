"""The batch book: which batches the folder has made, and which lines each holds, kept in the
ledger's SQLite and committed by `Ledger.commit` with the rest, so that it never says more
than what happened on disk and at the provider.

    batches(n, tag, model, state, batch_id, lines, bytes, reserved, at, info)
    batch_lines(id, n, line, tries, metadata)

A batch moves through these states; each is committed before the step that the next one
stands for could have happened:

    filling    its file OUT/batches/<n>.jsonl being written, its lines listed as they go (a
               batch found filling after a crash was never sent: it is forgotten, its lines
               staged again)
    staged     the file written whole and synced
    creating   committed BEFORE the call that makes the batch (`at`: when): a run killed
               during that call finds the batch by its tag (`BatchApi.find`), or, finding
               none, makes it (none was made, none is paid for)
    running    its id committed as soon as it is known
    taken      every line of its results written to the output files and indexed
    dropped    never to be followed again (its lines failed, or the provider lost it)

staged, creating and running are live: their lines are not staged again by a resumed run.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson

from pipeline.output.ledger import Ledger

FILLING, STAGED, CREATING, RUNNING, TAKEN, DROPPED = (
    "filling",
    "staged",
    "creating",
    "running",
    "taken",
    "dropped",
)
LIVE = (STAGED, CREATING, RUNNING)
FOLDER = "batches"  # OUT/batches/<n>.jsonl
_TOKEN = "batch_token"  # meta: this folder's part of every tag
# meta: where the folder's batches were sent (base URL, the key's variable, the shape), so that
# `pipeline cancel OUT` reaches them without the job file. No secret: a URL that carries a
# password is not kept (cancel then asks for --base-url).
ENDPOINT = "batch_endpoint"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS batches (
        n INTEGER PRIMARY KEY, tag TEXT, model TEXT, state TEXT, batch_id TEXT,
        lines INTEGER, bytes INTEGER, reserved REAL, at REAL, info BLOB
    )""",
    """CREATE TABLE IF NOT EXISTS batch_lines (
        n INTEGER, id TEXT, line INTEGER, tries INTEGER, metadata BLOB, PRIMARY KEY (n, id)
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS batch_lines_id ON batch_lines (id)",
)


class Batch(NamedTuple):
    n: int
    tag: str
    model: str
    state: str
    batch_id: str | None
    lines: int
    bytes: int
    reserved: float
    at: float | None
    info: dict[str, Any] | None


class Listed(NamedTuple):
    """A line as a batch holds it: what its outcome needs besides the answer."""

    custom_id: str
    line: int
    tries: int  # batches this line has been in, this one counted
    metadata: Any


class Book:
    def __init__(self, ledger: Ledger, folder: Path) -> None:
        self.ledger = ledger
        self.folder = folder / FOLDER
        db = ledger.writing()
        for statement in _SCHEMA:
            db.execute(statement)
        token = ledger.get(_TOKEN)
        if not isinstance(token, str):
            # A tag must be this folder's alone: two folders named alike at one provider
            # (`out`, every night) must not find each other's batches.
            token = os.urandom(6).hex()
            ledger.put(_TOKEN, token)
        self.token = token
        ledger.commit()

    def path(self, n: int) -> Path:
        return self.folder / f"{n}.jsonl"

    def tag(self, n: int) -> str:
        return f"pipeline-{self.token}-{n}"

    # -- reading -------------------------------------------------------------------------------

    def batches(self, *states: str) -> list[Batch]:
        marks = ", ".join("?" for _ in states)
        rows = self.ledger.reading().execute(
            f"SELECT n, tag, model, state, batch_id, lines, bytes, reserved, at, info FROM batches "
            f"WHERE state IN ({marks}) ORDER BY n",
            states,
        )
        return [_batch(row) for row in rows]

    def batch(self, n: int) -> Batch:
        row = (
            self.ledger.reading()
            .execute(
                "SELECT n, tag, model, state, batch_id, lines, bytes, reserved, at, info FROM batches WHERE n = ?",
                (n,),
            )
            .fetchone()
        )
        return _batch(row)

    def follow_live(self) -> bool:
        """Set aside the ids of the live batches as this run begins (False: there are none),
        for `followed`. Committed by the caller."""
        db = self.ledger.writing()
        db.execute("CREATE TEMP TABLE IF NOT EXISTS followed (id TEXT PRIMARY KEY) WITHOUT ROWID")
        db.execute("DELETE FROM followed")
        marks = ", ".join("?" for _ in LIVE)
        db.execute(
            f"INSERT OR IGNORE INTO followed SELECT id FROM batch_lines JOIN batches USING (n) "
            f"WHERE state IN ({marks})",
            LIVE,
        )
        return db.execute("SELECT 1 FROM followed LIMIT 1").fetchone() is not None

    def followed(self, custom_id: str) -> bool:
        """Whether the id was in a live batch as this run began: the run's to take in, never
        to stage again. Not the book as it stands: a batch taken in while the
        input is still read lets go of its lines, and one of them read after that (a failure,
        or any line where the reader looks at no index: none was done as the run began)
        would be staged again, and paid twice."""
        row = self.ledger.reading().execute("SELECT 1 FROM followed WHERE id = ?", (custom_id,))
        return row.fetchone() is not None

    def batch_ids(self, *, but: int) -> list[str]:
        """The provider's ids of the folder's other batches (finding one again passes them
        over: a folder's batches are often alike in model and size)."""
        rows = self.ledger.reading().execute(
            "SELECT batch_id FROM batches WHERE batch_id IS NOT NULL AND n != ?", (but,)
        )
        return [str(batch_id) for (batch_id,) in rows]

    def listed(self, n: int, custom_id: str) -> Listed | None:
        row = (
            self.ledger.reading()
            .execute(
                "SELECT id, line, tries, metadata FROM batch_lines WHERE n = ? AND id = ?", (n, custom_id)
            )
            .fetchone()
        )
        return None if row is None else _listed(row)

    def looked_up(
        self, n: int, ids: list[str], *, done: bool
    ) -> tuple[dict[str, Listed], set[str], set[str]]:
        """Those of `ids` the batch holds, and of those, the ids in the `taking` table (met in
        a run of this batch's lines before) and, where `done`, those done: one query for all
        three, where three a run of lines cost a fifth of taking a batch in."""
        if not ids:
            return {}, set(), set()
        marks = ", ".join("?" for _ in ids)
        finished = "EXISTS (SELECT 1 FROM done WHERE done.id = b.id)" if done else "0"
        rows = self.ledger.reading().execute(
            "SELECT b.id, b.line, b.tries, b.metadata, "
            f"EXISTS (SELECT 1 FROM taking WHERE taking.id = b.id), {finished} "
            f"FROM batch_lines b WHERE b.n = ? AND b.id IN ({marks})",
            (n, *ids),
        )
        listed: dict[str, Listed] = {}
        met: set[str] = set()
        ended: set[str] = set()
        for custom_id, line, tries, metadata, taking, is_done in rows:
            # (TEXT and INTEGER columns come back as str and int)
            listed[custom_id] = Listed(
                custom_id, line, tries, None if metadata is None else orjson.loads(metadata)
            )
            if taking:
                met.add(custom_id)
            if is_done:
                ended.add(custom_id)
        return listed, met, ended

    def lines_of(self, n: int) -> Iterator[Listed]:
        for row in self.ledger.reading().execute(
            "SELECT id, line, tries, metadata FROM batch_lines WHERE n = ? ORDER BY line", (n,)
        ):
            yield _listed(row)

    # -- writing (each step committed by the caller, with `Ledger.commit`) ---------------------

    def open(self, model: str) -> int:
        """A new batch, filling; its number (never one a batch that reached the provider had)."""
        db = self.ledger.writing()
        row = db.execute("SELECT coalesce(max(n), 0) FROM batches").fetchone()
        n = int(row[0]) + 1
        db.execute(
            "INSERT INTO batches (n, tag, model, state, lines, bytes, reserved) VALUES (?, ?, ?, ?, 0, 0, 0)",
            (n, self.tag(n), model, FILLING),
        )
        return n

    def list_lines(self, n: int, lines: Iterable[tuple[str, int, int, Any]]) -> None:
        """(custom_id, line, tries, metadata) of lines written to batch n's file."""
        self.ledger.writing().executemany(
            "INSERT OR REPLACE INTO batch_lines (n, id, line, tries, metadata) VALUES (?, ?, ?, ?, ?)",
            (
                (n, cid, line, tries, None if meta is None else orjson.dumps(meta))
                for cid, line, tries, meta in lines
            ),
        )

    def staged(self, n: int, *, lines: int, size: int, reserved: float = 0.0) -> None:
        self._set(n, "state = ?, lines = ?, bytes = ?, reserved = ?", STAGED, lines, size, reserved)

    def creating(self, n: int, at: float) -> None:
        self._set(n, "state = ?, at = ?", CREATING, at)

    def running(self, n: int, batch_id: str, info: dict[str, Any]) -> None:
        self._set(n, "state = ?, batch_id = ?, info = ?", RUNNING, batch_id, orjson.dumps(info))

    def looked(self, n: int, info: dict[str, Any]) -> None:
        self._set(n, "info = ?", orjson.dumps(info))

    def taken(self, n: int) -> None:
        """Every line of it written and indexed: its lines are history."""
        self._set(n, "state = ?", TAKEN)
        self.ledger.writing().execute("DELETE FROM batch_lines WHERE n = ?", (n,))

    def dropped(self, n: int) -> None:
        self._set(n, "state = ?", DROPPED)
        self.ledger.writing().execute("DELETE FROM batch_lines WHERE n = ?", (n,))

    def forget_filling(self) -> list[int]:
        """Batches a killed run left filling: never sent, so forgotten (their lines are not
        live, and are staged again). Returns their numbers, whose files may be removed."""
        return self._forget(FILLING)

    def forget_staged_done(self) -> list[int]:
        """Batches staged and never submitted that hold a line done since (a synchronous run
        into the folder sent it): forgotten, as filling ones are, so that their lines not done
        are staged again from the input and the done ones are not paid twice. Returns their
        numbers, whose files may be removed."""
        db = self.ledger.writing()
        ns = [
            int(n)
            for (n,) in db.execute(
                "SELECT DISTINCT n FROM batch_lines JOIN batches USING (n) "
                "WHERE state = ? AND id IN (SELECT id FROM done)",
                (STAGED,),
            )
        ]
        db.executemany("DELETE FROM batch_lines WHERE n = ?", ((n,) for n in ns))
        db.executemany("DELETE FROM batches WHERE n = ?", ((n,) for n in ns))
        return ns

    def forget_staged(self) -> list[int]:
        """Every batch staged and never submitted, forgotten as filling ones are: a --redo run
        changed the job, and their lines are staged again with it (they cost nothing yet).
        Returns their numbers, whose files may be removed."""
        return self._forget(STAGED)

    def _forget(self, state: str) -> list[int]:
        db = self.ledger.writing()
        ns = [int(n) for (n,) in db.execute("SELECT n FROM batches WHERE state = ?", (state,))]
        db.executemany("DELETE FROM batch_lines WHERE n = ?", ((n,) for n in ns))
        db.executemany("DELETE FROM batches WHERE n = ?", ((n,) for n in ns))
        return ns

    def _set(self, n: int, assignments: str, *values: Any) -> None:
        self.ledger.writing().execute(f"UPDATE batches SET {assignments} WHERE n = ?", (*values, n))


def _batch(row: Any) -> Batch:
    n, tag, model, state, batch_id, lines, size, reserved, at, info = row
    return Batch(
        int(n),
        str(tag),
        str(model),
        str(state),
        batch_id,
        int(lines or 0),
        int(size or 0),
        float(reserved or 0.0),
        None if at is None else float(at),
        None if info is None else orjson.loads(info),
    )


def _listed(row: Any) -> Listed:
    custom_id, line, tries, metadata = row
    return Listed(str(custom_id), int(line), int(tries), None if metadata is None else orjson.loads(metadata))
