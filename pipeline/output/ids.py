"""The ids a merge has written, on disk: a temporary SQLite file in OUT, so that checking a
million lines for an id seen before costs the index's few tens of megabytes of disk (gone when
the merge ends) and a bounded page cache of memory, never a Python set of every id.

Two tables, apart so that no id can pass for a key: the custom_ids written to results.jsonl,
and the keys of the failures written to errors.jsonl (a request's custom_id, an input line's
`line:N`, as `writer.failure_key` makes them).
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

_SCHEMA = """
CREATE TABLE result (id TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE failure (key TEXT PRIMARY KEY) WITHOUT ROWID;
"""


class IdIndex:
    def __init__(self, path: Path) -> None:
        self.path = path
        _remove(path)  # left by a merge that was killed: nobody else uses it (OUT's merge lock)
        self._db = sqlite3.connect(path, isolation_level=None)
        # A scratch file, rebuilt by every merge: nothing to journal or to sync for a crash.
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        self._db.execute("PRAGMA cache_size=-2048")  # KiB: the memory it may hold, whatever the job's size
        self._db.executescript(_SCHEMA)
        self._db.execute("BEGIN")

    def close(self) -> None:
        try:
            self._db.close()
        finally:
            _remove(self.path)

    def first_result(self, custom_id: str) -> bool:
        """Note a result's id; whether it is the first with it."""
        cur = self._db.execute("INSERT OR IGNORE INTO result (id) VALUES (?)", (custom_id,))
        return cur.rowcount == 1

    def has_result(self, custom_id: str) -> bool:
        return self._db.execute("SELECT 1 FROM result WHERE id = ?", (custom_id,)).fetchone() is not None

    def first_failure(self, key: str) -> bool:
        """Note a failure's key; whether it is the first with it."""
        cur = self._db.execute("INSERT OR IGNORE INTO failure (key) VALUES (?)", (key,))
        return cur.rowcount == 1


def _remove(path: Path) -> None:
    for leftover in (path, path.with_name(path.name + "-journal")):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
