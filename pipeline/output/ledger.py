"""The output folder's memory between runs, kept on disk so it never grows in RAM.

`results.jsonl` is the truth about what succeeded; `ledger.sqlite` is its index, plus what
the results file cannot say. Tables:

- `done`: every custom_id with a line in results.jsonl, up to `results_offset` bytes.
- `failed`: what errors.jsonl must list (one row per request or input line that ended
  failed), so the file can be rewritten to list only what is failed now.
- `seen` (temporary, per run): the ids read so far, to find duplicates in the input; the
  first `SEEN_IN_MEMORY` of them (up to `SEEN_BYTES` of text) are kept in memory instead.
- `meta`: the job's fingerprint, `results_offset`, the usage totals of every run, and
  `open_run` while a run goes: set before it writes anything, cleared with its end record, so
  a folder whose last run was killed says so (a merge repairs it first).

The index is committed only after the results file is synced up to `results_offset`, so
after any crash the index is behind the file, never ahead; `reconcile` reads the tail the
index has not seen yet. A result is therefore never forgotten (paid twice) nor invented.

Nothing is committed but by `commit`, whole: a step that fails part way is rolled back
(`rollback`), and no write ever runs outside a transaction, even after SQLite rolled one back
by itself (it may, after an I/O error or a full disk). Else a done id could be committed
without the offset that goes with it, and `reconcile` would then cut its line as a copy.

One commit fails and holds all the same: the `seen` ids live in SQLite's temporary store
(SQLITE_TMPDIR, TMPDIR or /var/tmp, not the folder), and a transaction over a WAL database
and that store is atomic in each, not across the two. When the store is full, COMMIT writes
the index whole, then fails on the store: `landed` says so, and the counts are what was
committed (the run still stops: the ids it read since the last commit are forgotten).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

OPEN_RUN = "open_run"  # meta: the run that began and has not ended (when, where, its prices)
_COMMITS = "commits"  # meta: how many commits were made, each counting itself
# An id noted in SQLite cost 11,000 instructions a line read more than one noted in a dict:
# a run's first ids are held in a dict instead (about 5 MB at most; 9 were every character
# outside the BMP, 4 bytes each), the rest go to SQLite, so memory stays bounded whatever
# the input's size.
SEEN_IN_MEMORY = 32_768
SEEN_BYTES = 1 << 20  # characters of those ids

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS done (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failed (
    key TEXT PRIMARY KEY, line INTEGER, kind TEXT, stale INTEGER, record BLOB
) WITHOUT ROWID;
"""


class Ledger:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._prepare()
            self.done_count = self._count("done")
            self.failed_count = self._count("failed")
            self._serial = int(self.get(_COMMITS) or 0)  # commits made: how one that failed is known to hold
        except BaseException:
            self._db.close()  # left open, it would keep a write lock in a long-lived process
            raise
        self._committed_done = self.done_count
        self._seen: dict[str, int] = {}  # id -> line, the first ids read this run
        self._seen_bytes = 0
        self._in_memory = True  # no id of this run has gone to SQLite yet
        self._seen_new: list[str] = []  # those noted since the last commit, which a rollback forgets
        self.landed = False  # the last commit failed, yet the index's part of it holds (see above)
        self.previous: Path | None = None  # where --fresh moved the folder's earlier files
        self.changes: list[str] = []  # how a --redo run's job differs from the one recorded

    def _prepare(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: a commit may be lost on power failure, but the file is never corrupt;
        # losing a commit only puts the index further behind results.jsonl, which is safe.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA temp_store=FILE")
        # SQLite's page caches (2 MiB each by default, main and temp) fill up on a big input
        # and were most of what a 1,000,000-line run held over a 10,000-line one. At 512 KiB
        # each, 300,000 random UUID ids ran no slower (the OS caches the pages anyway).
        self._db.execute("PRAGMA cache_size=-512")
        self._db.execute("PRAGMA temp.cache_size=-512")
        self._db.executescript(_SCHEMA)
        # WITHOUT ROWID, as the tables above: the id is the key, one B-tree where a rowid
        # table keeps two (itself and its key's index). Every line read inserts into `seen`:
        # 1.5 us an id instead of 1.9, and half the temporary store.
        self._db.execute(
            "CREATE TEMP TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, line INTEGER) WITHOUT ROWID"
        )
        self._db.execute(
            "CREATE TEMP TABLE IF NOT EXISTS copies (base TEXT PRIMARY KEY, n INTEGER) WITHOUT ROWID"
        )
        self._db.execute("BEGIN")

    def _count(self, table: str) -> int:
        row = self._db.execute(f"SELECT count(*) FROM {table}").fetchone()
        return int(row[0])

    def close(self, *, commit: bool = True) -> None:
        """Close; with `commit=False` what was not committed is dropped."""
        try:
            if commit and self._db.in_transaction:
                self._db.execute("COMMIT")
        finally:
            self._db.close()

    def commit(self) -> None:
        """Commit all since the last commit, or (raising) nothing of it; or, raising too, all
        of the index but not the temporary store, which `landed` then says. The next write
        begins the next transaction (`_begun`): once COMMIT has returned, nothing can undo it."""
        serial, pending = self._serial + 1, self.done_count
        self.landed = False
        try:
            self.put(_COMMITS, serial)
            self._db.execute("COMMIT")
        except BaseException:
            self.rollback()
            with contextlib.suppress(sqlite3.Error):
                self.landed = self.get(_COMMITS) == serial
            if self.landed:
                self._serial, self.done_count, self._committed_done = serial, pending, pending
            raise
        self._serial, self._committed_done = serial, pending
        self._seen_new.clear()

    def flush(self) -> None:
        """What is committed made to outlast a power cut: the WAL synced to the disk (NORMAL
        leaves that to a checkpoint). For the commits that something outside the folder acts on
        at once: a batch about to be made at the provider, or about to be deleted there."""
        try:
            fd = os.open(self.path.with_name(self.path.name + "-wal"), os.O_RDONLY)
        except FileNotFoundError:
            return  # (no WAL: every commit is in the file already)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def rollback(self) -> None:
        """Forget all since the last commit. Should even that fail, the connection is closed
        (which rolls back too): every later call then fails, and nothing more is committed."""
        self.done_count = self._committed_done
        for custom_id in self._seen_new:  # as SQLite forgets the ids it holds
            if self._seen.pop(custom_id, None) is not None:
                self._seen_bytes -= len(custom_id)
        self._seen_new.clear()
        try:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
        except BaseException:
            self._db.close()
            raise

    def _begun(self) -> sqlite3.Connection:
        if not self._db.in_transaction:
            self._db.execute("BEGIN")
        return self._db

    def writing(self) -> sqlite3.Connection:
        """The connection, inside the ledger's transaction: for a book that keeps its own
        tables here (`pipeline.batch.book`), committed or rolled back with the rest."""
        return self._begun()

    def reading(self) -> sqlite3.Connection:
        return self._db

    # -- meta ------------------------------------------------------------------------------

    def get(self, key: str) -> Any:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else orjson.loads(row[0])

    def put(self, key: str, value: Any) -> None:
        self._begun().execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, orjson.dumps(value))
        )

    # -- the reader's questions --------------------------------------------------------------

    def is_done(self, custom_id: str) -> bool:
        if not self.done_count:
            return False
        return self._db.execute("SELECT 1 FROM done WHERE id = ?", (custom_id,)).fetchone() is not None

    def see(self, custom_id: str, line: int) -> int | None:
        """Note an id read on `line`; if it was read before in this run, the earlier line."""
        seen = self._seen
        earlier = seen.get(custom_id)
        if earlier is not None:
            return earlier
        if self._in_memory:
            size = self._seen_bytes + len(custom_id)  # (one id may be a line's 32 MiB: not here)
            if len(seen) < SEEN_IN_MEMORY and size <= SEEN_BYTES:
                seen[custom_id] = line
                self._seen_bytes = size
                self._seen_new.append(custom_id)
                return None
            self._in_memory = False  # the rest to SQLite: a new id in the dict would miss those
        cur = self._begun().execute("INSERT OR IGNORE INTO seen (id, line) VALUES (?, ?)", (custom_id, line))
        if cur.rowcount:
            return None
        row = self._db.execute("SELECT line FROM seen WHERE id = ?", (custom_id,)).fetchone()
        return int(row[0])

    def see_copy(self, base: str, line: int) -> str:
        """The id of a line that brings none: `base` (from its bytes), or `base-n` for the
        n-th identical line, the same on every run since lines come in the same order."""
        if self.see(base, line) is None:
            return base
        row = self._db.execute("SELECT n FROM copies WHERE base = ?", (base,)).fetchone()
        n = (int(row[0]) if row else 1) + 1
        while self.see(f"{base}-{n}", line) is not None:
            n += 1
        self._begun().execute("INSERT OR REPLACE INTO copies (base, n) VALUES (?, ?)", (base, n))
        return f"{base}-{n}"

    # -- the writer's records ----------------------------------------------------------------

    def add_done(self, ids: Iterable[str]) -> int:
        """Index ids as done; returns how many were new."""
        # (zip makes each id its row in C, where a generator made it in Python: every result comes here)
        cur = self._begun().executemany("INSERT OR IGNORE INTO done (id) VALUES (?)", zip(ids))
        added = max(cur.rowcount, 0)
        self.done_count += added
        return added

    def drop_done(self, ids: Iterable[str]) -> int:
        """Take ids out of `done` (lines to send again: `pipeline.output.redo`); how many were."""
        cur = self._begun().executemany("DELETE FROM done WHERE id = ?", zip(ids))
        dropped = max(cur.rowcount, 0)
        self.done_count -= dropped
        return dropped

    def clear_done(self) -> None:
        self._begun().execute("DELETE FROM done")
        self.done_count = 0

    def add_failed(self, rows: Iterable[tuple[str, int, str, bytes]]) -> None:
        self._begun().executemany(
            "INSERT OR REPLACE INTO failed (key, line, kind, stale, record) VALUES (?, ?, ?, 0, ?)",
            rows,
        )

    def drop_failed(self, keys: Iterable[str]) -> None:
        self._begun().executemany("DELETE FROM failed WHERE key = ?", zip(keys))

    def start_run(self) -> None:
        """Mark every listed failure as stale until this run meets it again."""
        self._begun().execute("DELETE FROM seen")
        self._seen.clear()
        self._seen_new.clear()
        self._seen_bytes, self._in_memory = 0, True
        self._db.execute("DELETE FROM copies")
        self._db.execute("UPDATE failed SET stale = 1")
        self.commit()

    def forget_stale(self, last_line: int) -> None:
        """After reading up to `last_line`: drop input errors not found again, and
        request failures whose id is no longer in the input."""
        self._begun().execute(
            "DELETE FROM failed WHERE kind = 'input' AND stale = 1 AND line <= ?", (last_line,)
        )
        stale = "FROM failed WHERE kind = 'request' AND stale = 1 AND line <= ?"
        if self._seen and self._db.execute(f"SELECT 1 {stale} LIMIT 1", (last_line,)).fetchone():
            # The ids held in memory join SQLite's for the query below: only where it has
            # failures to look up (a folder that has none, as most, is spared the inserts).
            self._db.executemany("INSERT OR IGNORE INTO seen (id, line) VALUES (?, ?)", self._seen.items())
        self._db.execute(
            "DELETE FROM failed WHERE kind = 'request' AND stale = 1 AND line <= ? "
            "AND key NOT IN (SELECT id FROM seen)",
            (last_line,),
        )

    def count_failed(self) -> int:
        self.failed_count = self._count("failed")
        return self.failed_count

    def failures(self) -> Iterator[tuple[int, str, str, bytes]]:
        """The error lines errors.jsonl should hold now, in input order, each with its line's
        number, key (see `lines.failure_key`) and kind: (line, key, kind, record)."""
        for line, key, kind, record in self._db.execute(
            "SELECT line, key, kind, record FROM failed ORDER BY line, key"
        ):
            yield int(line), str(key), str(kind), bytes(record)
