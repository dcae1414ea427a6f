"""The answers kept, in SQLite at DIR/answers.sqlite: one file shared by every run and shard
that names DIR, bounded by `max_gb`, the least recently used out first.

    answers   id (the key's first 8 bytes: the rowid, so a lookup is one B-tree search), the
              whole key (an id two keys share is a miss, never the other's answer), the body
              packed (`pipeline.cache.pack`), the model asked, what it cost when bought and at
              which tier, when it was bought, when it was last used (unix ms, so that flushes a
              moment apart are told apart; written at most once a minute; never before the
              newest use kept, whatever the clock says), and the bytes it counts for
              against the bound
    meta      the format, and the running total of bytes and rows, kept by triggers in the
              transaction that inserts or deletes: no SUM over the table, whoever wrote

Several processes at once: WAL (readers never wait for a writer), a busy timeout, and short
write transactions (`BEGIN IMMEDIATE`, so two writers queue instead of one failing). Writes
are batched: `put` only queues (a later `get` in this process sees it at once); `flush`
writes the queue in one transaction, with executemany, and the uses noted by `get` (a row's
time is refreshed at most once a minute); `synchronous=NORMAL`, as the ledger: a commit costs
no fsync (only a WAL checkpoint does, every few MB), and what a power cut loses is only
answers not kept, never a damaged file. Over the bound, a flush deletes the oldest rows until
the total is 10 % under it (`pipeline.cache.evict`); an answer bigger than that is not kept.

The cache never fails a run: a file that is damaged, not a database, or of a newer format
turns it off with one warning line saying where and what to do (`pipeline.cache.broken`), and
the run goes on sending every request. One this process cannot write (a read-only folder or
disk), and a write that fails later (a full disk), stop the keeping only: answers already
kept are still reused (`pipeline.cache.readonly`).

Measured (20,000 answers, one core of a loaded 2-core machine): 22,500 puts a second for
bodies of 820 bytes (flush 42 µs an answer, most of it packing), 8,800 for 2,285 bytes; a hit
13 to 21 µs (read, unpack); 422 and 1,464 bytes of file an answer (before the ten bytes a body
of zlib's check, `pipeline.cache.pack`). The file holds no prompt: only the hash of each
request, and the answer.
"""

from __future__ import annotations

import contextlib
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from pipeline.cache.broken import NewerFormat, code_of, warning
from pipeline.cache.evict import evict, largest
from pipeline.cache.pack import pack, unpack
from pipeline.cache.readonly import reading

FILE = "answers.sqlite"
FORMAT = 1
FLUSH_ROWS = 256  # answers queued before `due` says a flush is wanted
FLUSH_EVERY = 1.0  # seconds: or this long since the last flush, with any queued
_QUEUE_MOST = 4096  # queued answers at which `put` flushes itself (a caller that forgot to)
TOUCH_EVERY = 60  # seconds: a row's time of use is written at most this often
# What a row counts for against the bound: its bytes (body packed, model, and about 45 more:
# key, numbers, header, its entry in the index of use) over the fill of a B-tree filled at
# random (1 / ln 2: the ids are hashes), so that the file is about the bound. Measured: 423
# bytes a row on disk where a body of 818 bytes packs into 237, 1,465 where 2,273 into 959.
ROW_BYTES = 45
_FILL = 1.44
BUSY_MS = 10_000

_SCHEMA = f"""
BEGIN IMMEDIATE;
CREATE TABLE IF NOT EXISTS answers (
    id INTEGER PRIMARY KEY, key BLOB NOT NULL, body BLOB NOT NULL, packed INTEGER NOT NULL,
    model TEXT NOT NULL, cost REAL, tier TEXT NOT NULL, paid REAL NOT NULL,
    used INTEGER NOT NULL, size INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS answers_used ON answers (used);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta VALUES ('format', {FORMAT}), ('bytes', 0), ('rows', 0);
CREATE TRIGGER IF NOT EXISTS kept AFTER INSERT ON answers BEGIN
    UPDATE meta SET value = value + NEW.size WHERE name = 'bytes';
    UPDATE meta SET value = value + 1 WHERE name = 'rows';
END;
CREATE TRIGGER IF NOT EXISTS dropped AFTER DELETE ON answers BEGIN
    UPDATE meta SET value = value - OLD.size WHERE name = 'bytes';
    UPDATE meta SET value = value - 1 WHERE name = 'rows';
END;
COMMIT;
"""
_GET = "SELECT key, body, packed, model, cost, tier, paid, used FROM answers WHERE id = ?"
_PUT = (
    "INSERT OR IGNORE INTO answers (id, key, body, packed, model, cost, tier, paid, size, used)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_TOTALS = "SELECT (SELECT value FROM meta WHERE name = 'bytes'), (SELECT value FROM meta WHERE name = 'rows')"


class Answer(NamedTuple):
    """An answer as kept: what a run needs to write it as a result and to report it."""

    body: bytes  # the completion body, JSON, as it came (a streamed one as assembled)
    model: str  # the model asked for
    cost: float | None  # dollars it cost when bought (None: not known)
    tier: str = "sync"  # bought at the synchronous price, or "batch"
    paid: float = 0.0  # when it was bought, unix seconds (0: at `put`)


def _id(key: bytes) -> int:
    return int.from_bytes(key[:8], "big", signed=True)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


class AnswerCache:
    """The answers kept at `folder` (made if missing). `get` from one thread at a time (the
    event loop's: a hit is one indexed read, about 10 µs); `flush` from any one thread (it
    may wait up to `BUSY_MS` for another process's write: best in a worker thread)."""

    def __init__(
        self,
        folder: Path,
        *,
        max_gb: float | None = None,
        warn: Callable[[str], None] = _stderr,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = folder / FILE
        self.max_bytes = None if max_gb is None else int(max_gb * 1e9)
        self._warn, self._clock = warn, clock
        self._lock = threading.Lock()  # the queue, swapped by `flush` while `put` adds to it
        self._flushing = threading.Lock()
        self._queue: dict[bytes, Answer] = {}
        self._writing: dict[bytes, Answer] = {}  # taken by a flush, not yet committed: still seen
        self._touched: dict[int, None] = {}  # ids `get` found, their time of use to refresh
        # Keys whose kept answer is no good (unreadable, or failing a caller's check): the
        # next answer put for one replaces it, where it would be ignored and bought every run.
        self._rejected: set[bytes] = set()
        self._last_flush = clock()
        self._reader: sqlite3.Connection | None = None
        self._writer: sqlite3.Connection | None = None
        self.warned: str | None = None  # the warning given, if any
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._writer = self._connect()
            self._writer.executescript(_SCHEMA)  # (one transaction: shards opening at once queue)
            (found,) = self._writer.execute("SELECT value FROM meta WHERE name = 'format'").fetchone()
            if found != FORMAT:
                raise NewerFormat(found, FORMAT)
            self._reader = self._connect()
        except (OSError, sqlite3.Error, NewerFormat) as e:
            # A cache this process may not write (a read-only folder or disk) is still read:
            # its answers taken, none kept (as `pipeline estimate --cache` counts them).
            reader = None if isinstance(e, NewerFormat) else reading(self.path, FORMAT)
            if reader is None:
                self._off(e)
            else:
                self._off(e, writing_only=True)
                self._reader = reader

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_MS / 1000)
        try:
            db.execute(f"PRAGMA busy_timeout={BUSY_MS}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA cache_size=-512")
            db.execute("PRAGMA journal_size_limit=67108864")  # a WAL checkpointed back to 64 MB
        except BaseException:
            db.close()
            raise
        return db

    @property
    def usable(self) -> bool:
        """Whether answers can be taken from it (a broken cache is off, warned about once)."""
        return self._reader is not None

    @property
    def keeping(self) -> bool:
        """Whether answers put are kept."""
        return self._writer is not None

    def get(self, key: bytes) -> Answer | None:
        """The answer kept under `key`, or None."""
        reader = self._reader  # (once: a flush in another thread may turn the cache off)
        if reader is None:
            return None
        answer = self._queue.get(key) or self._writing.get(key)
        if answer is not None:
            return answer
        id_ = _id(key)
        try:
            row = reader.execute(_GET, (id_,)).fetchone()
        except sqlite3.Error as e:
            self._off(e)
            return None
        if row is None or row[0] != key:
            return None
        _, kept, how, model, cost, tier, paid, used = row
        try:
            body = unpack(kept, how)
        except ValueError:
            self.reject(key)
            return None  # (one row a newer version packed, or damaged: a miss, sent again)
        if self._clock() - used / 1000 >= TOUCH_EVERY:
            with self._lock:
                self._touched[id_] = None
        return Answer(body, model, cost, tier, paid)

    def reject(self, key: bytes) -> None:
        """The answer kept under `key` is no good: the next `put` of it replaces it."""
        with self._lock:
            self._rejected.add(key)

    def put(self, key: bytes, answer: Answer) -> None:
        """Queue `answer` to be kept under `key` (the first answer put for a key stays, unless
        the kept one was rejected)."""
        if self._writer is None:
            return
        if not answer.paid:
            answer = answer._replace(paid=self._clock())
        with self._lock:
            if key in self._rejected:
                self._queue[key] = answer
            else:
                self._queue.setdefault(key, answer)
            full = len(self._queue) >= _QUEUE_MOST
        if full:
            self.flush()

    @property
    def due(self) -> bool:
        """Whether a flush is wanted now: a batch queued, or answers queued a second (or
        since a time the clock has gone back past: else they waited for it to come round)."""
        queued = len(self._queue)
        if queued >= FLUSH_ROWS:
            return True
        since = self._clock() - self._last_flush
        return queued > 0 and (since >= FLUSH_EVERY or since < 0)

    def flush(self) -> None:
        """Write what is queued in one short transaction; over the bound, evict. A busy
        database keeps the queue for the next flush; any other failure stops the keeping."""
        with self._flushing:
            with self._lock:
                self._writing, self._queue = self._queue, {}
                touched, self._touched = self._touched, {}
                replacing = [key for key in self._writing if key in self._rejected]
                self._rejected.difference_update(replacing)
            self._last_flush = now = self._clock()
            try:
                if self._writer is not None and (self._writing or touched):
                    self._write(self._writer, self._writing, touched, int(now * 1000), replacing)
            finally:
                self._writing = {}

    def _write(
        self,
        db: sqlite3.Connection,
        answers: dict[bytes, Answer],
        touched: dict[int, None],
        used: int,
        replacing: list[bytes],
    ) -> None:
        rows = []
        most = None if self.max_bytes is None else largest(self.max_bytes)
        for key, (body, model, cost, tier, paid) in answers.items():
            kept, how = pack(body)  # (before the transaction: it holds other writers back)
            size = int((len(kept) + len(model) + ROW_BYTES) * _FILL)
            if most is None or size <= most:
                rows.append((_id(key), key, kept, how, model, cost, tier, paid, size))
        try:
            db.execute("BEGIN IMMEDIATE")
            if replacing:  # (deleted, not INSERT OR REPLACE: the trigger then counts the bytes freed)
                db.executemany(
                    "DELETE FROM answers WHERE id = ? AND key = ?", ((_id(k), k) for k in replacing)
                )
            # Never before the newest use kept: a clock set back (or another process's, ahead)
            # made the answers bought since look the oldest, the first evicted.
            (newest,) = db.execute("SELECT max(used) FROM answers").fetchone()
            if newest is not None and newest >= used:
                used = newest + 1
            db.executemany(_PUT, ((*row, used) for row in rows))
            if touched:
                db.executemany("UPDATE answers SET used = ? WHERE id = ?", ((used, id_) for id_ in touched))
            if self.max_bytes is not None:
                evict(db, self.max_bytes)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            code = code_of(e)
            if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
                self._off(e)
            elif code != sqlite3.SQLITE_BUSY:
                self._off(e, writing_only=True)
            elif len(self._queue) < _QUEUE_MOST:  # (past that, dropped: it is only a cache)
                with self._lock:
                    self._queue = {**answers, **self._queue}
                    self._rejected.update(replacing)

    def totals(self) -> tuple[int, int]:
        """Bytes counted against the bound, and answers kept (0, 0 when off)."""
        if self._reader is None:
            return 0, 0
        try:
            total, rows = self._reader.execute(_TOTALS).fetchone()
        except sqlite3.Error as e:
            self._off(e)
            return 0, 0
        return int(total), int(rows)

    def close(self) -> None:
        """Flush, and let the file go."""
        with contextlib.suppress(sqlite3.Error):
            self.flush()
        for db in (self._reader, self._writer):
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
        self._reader = self._writer = None

    def _off(self, error: BaseException, *, writing_only: bool = False) -> None:
        """Stop using the cache (or only keeping answers), with one warning line."""
        readers = () if writing_only else (self._reader,)
        for db in (self._writer, *readers):
            if db is not None:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
        self._writer = None
        if not writing_only:
            self._reader = None
        if self.warned is not None:
            return
        line = warning(error, self.path, writing_only=writing_only)
        self.warned = line
        self._warn(line)
