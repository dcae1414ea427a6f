"""The answer cache's file opened to be read only: by `pipeline estimate --cache`
(`pipeline.cache.peek`), and by a run whose cache it cannot write (a read-only folder or
disk), which then takes the answers kept there and keeps none."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from pipeline.cache.broken import NewerFormat


def open_read_only(path: Path, known: int) -> sqlite3.Connection:
    """The cache file at `path`, opened to be read only, its format checked against `known`
    (raises sqlite3.Error, or NewerFormat for a format this version does not know).

    One no process has open (no WAL file: the last to close it checkpointed and removed it)
    is read as a file nobody changes (`immutable`): `mode=ro` would make its -wal and -shm
    files and leave them, a reader may not remove them; made by `sudo pipeline estimate`,
    root's, they would turn the owner's cache off. A writer that opens it meanwhile writes
    to a WAL this connection does not see (a count a moment old), and into the file only at
    a checkpoint, every few MB: a page read as it changes is an error, a miss. One a process
    has open is read through its WAL; where even that cannot be (its shared-memory file
    gone, in a folder this process may not write), as it stands on disk."""
    uri = path.absolute().as_uri()
    wal = path.with_name(path.name + "-wal")
    hows = ("?mode=ro", "?immutable=1") if wal.exists() else ("?immutable=1",)
    error: sqlite3.Error | None = None
    for how in hows:
        db: sqlite3.Connection | None = None
        try:
            db = sqlite3.connect(uri + how, uri=True, check_same_thread=False)
            row = db.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            error = e
            continue
        if row is None or row[0] != known:
            db.close()
            raise NewerFormat(None if row is None else row[0], known)
        return db
    assert error is not None
    raise error


def reading(path: Path, known: int) -> sqlite3.Connection | None:
    """`open_read_only`, or None where the file is missing or even that fails."""
    if not path.is_file():
        return None
    try:
        return open_read_only(path, known)
    except (sqlite3.Error, NewerFormat):
        return None
