"""Twins (issue 23, point 2, at the batch tier, with `--cache DIR`): lines of one run whose
request is the same as that of a line staged before them and not taken in yet (its leader).
A twin is not staged: it is listed in the book beside its leader's batch,

    batch_twins(n, id, key, line, metadata)

and that batch, taken in, answers it (`pipeline.batch.intake`):

    the leader's answer            the twin's, reused (cost_not_spent: the leader's, at the
                                   batch price), written with the batch's outcomes
    the leader goes again          the twin follows it into its new batch
    the leader ends otherwise      the twin goes itself, in a new batch (or, `--then sync`,
    (a failure, no tries left)     now, where the synchronous tier's sharing takes over): all
                                   of them at once, as the synchronous tier sends the waiters
                                   of a failing key, not one a day
    the batch halted or dropped    the twin fails as its leader did, unsent: the next run

All of it in the commit that takes the batch: a twin is never both staged and reused, and a
run killed before that commit finds its twins listed still, followed with their batch (a
twin is never read again from the input and staged while its batch is live). A leader's
answer written by an earlier go at the batch (a kill) is taken from the batch's results,
read again (else from the answer cache, only a source); when it is not found, the twin goes
itself.

Why listed, not left pending in the input for a later staging round: the input is read once
a run, so a twin not listed anywhere would be left undone until the next run.

What the stager remembers of the leaders is 8 bytes of their key and their batch's number,
for the batches not taken in yet (a few dozen bytes a distinct request in flight); a twin
listed with a batch that holds no line of its full key (two keys alike in those 8 bytes: one
chance in 10^19 a pair) fails unsent, and the next run sends it: never answered wrongly.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import anyio
import orjson

from pipeline.batch.book import LIVE, Book, Listed
from pipeline.job import Request

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS batch_twins "
    "(n INTEGER, id TEXT, key BLOB, line INTEGER, metadata BLOB, PRIMARY KEY (n, id)) WITHOUT ROWID"
)


PRUNE_AT = 4096


class Twins:
    """The leaders staged by this run, and their twins listed in the book."""

    def __init__(self, book: Book, *, scope: str) -> None:
        self.book = book
        self.scope = scope  # what the keys are scoped by (`Reuse.scope`)
        self._leaders: dict[int, int] = {}  # 8 bytes of a key -> its leader's batch
        self._closing: set[int] = set()  # batches being taken in: no twin joins them now
        self._prune_at = PRUNE_AT  # leaders remembered, past which those of closed batches go
        db = book.ledger.writing()
        db.execute(SCHEMA)

    def sweep(self) -> bool:
        """As a run begins: the twins of batches not live (forgotten, taken, dropped) let go,
        and those of live ones followed (never staged again from the input). Committed by
        the caller, after `Book.follow_live`. Whether any is left."""
        db = self.book.ledger.writing()
        marks = ", ".join("?" for _ in LIVE)
        db.execute(
            f"DELETE FROM batch_twins WHERE n NOT IN (SELECT n FROM batches WHERE state IN ({marks}))", LIVE
        )
        db.execute("INSERT OR IGNORE INTO followed SELECT id FROM batch_twins")
        return db.execute("SELECT 1 FROM batch_twins LIMIT 1").fetchone() is not None

    async def seed(self, ns: Iterable[int]) -> None:
        """The lines of the live batches an earlier run staged lead too: a run killed before
        it read all the input stages none of their twins it reads now (read back from the
        batches' files, in a thread)."""
        from pipeline.batch.keep import keys_of  # (the cache's modules: only for a run with one)

        for n in ns:
            keys = await anyio.to_thread.run_sync(keys_of, self.book.path(n), self.scope)
            for key in keys.values():
                self.lead(key, n)

    def attach(self, key: bytes, request: Request) -> bool:
        """List the request as a twin of the leader of `key` staged by this run, whose batch
        is not being taken in; False where there is none (then it is staged, and leads)."""
        n = self._leaders.get(_short(key))
        if n is None or n in self._closing:
            return False
        metadata = None if request.metadata is None else orjson.dumps(request.metadata)
        self.book.ledger.writing().execute(
            "INSERT OR REPLACE INTO batch_twins (n, id, key, line, metadata) VALUES (?, ?, ?, ?, ?)",
            (n, request.custom_id, key, request.line, metadata),
        )
        return True

    def lead(self, key: bytes, n: int) -> None:
        """A line of `key` staged in batch `n`: it leads the twins that come after it."""
        self._leaders[_short(key)] = n
        if len(self._leaders) >= self._prune_at:  # (amortized: not a pass at every batch taken)
            self._leaders = {k: m for k, m in self._leaders.items() if m not in self._closing}
            self._prune_at = 2 * len(self._leaders) + PRUNE_AT

    def closing(self, n: int) -> None:
        """Batch `n` is being taken in: its leaders lead no more twins (a later one of their
        key is staged, unless the cache holds the answer by then)."""
        self._closing.add(n)

    def of(self, n: int) -> Iterator[tuple[Listed, bytes]]:
        """The twins listed with batch `n`, with their keys, read as they are taken (a batch
        may have a million: a spam text's)."""
        rows = self.book.ledger.reading().execute(
            "SELECT id, line, metadata, key FROM batch_twins WHERE n = ? ORDER BY line", (n,)
        )
        for cid, line, meta, key in rows:
            yield Listed(str(cid), int(line), 0, None if meta is None else orjson.loads(meta)), bytes(key)

    def count(self, n: int) -> int:
        """How many twins are listed with batch `n`."""
        row = (
            self.book.ledger.reading()
            .execute("SELECT count(*) FROM batch_twins WHERE n = ?", (n,))
            .fetchone()
        )
        return int(row[0])

    def keys(self, n: int) -> set[bytes]:
        """The keys the twins listed with batch `n` wait for."""
        rows = self.book.ledger.reading().execute("SELECT DISTINCT key FROM batch_twins WHERE n = ?", (n,))
        return {bytes(key) for (key,) in rows}

    def follow(self, n: int, moves: Iterable[tuple[str, str, bytes]]) -> None:
        """Twins of batch `n` moved to the batch their leader goes again in (twin, leader,
        key); which then leads the twins that come after them."""
        db = self.book.ledger.writing()
        for twin, leader, key in moves:
            row = db.execute("SELECT max(n) FROM batch_lines WHERE id = ? AND n > ?", (leader, n)).fetchone()
            if row is not None and row[0] is not None:
                db.execute("UPDATE batch_twins SET n = ? WHERE n = ? AND id = ?", (int(row[0]), n, twin))
                self.lead(key, int(row[0]))

    def let_go(self, n: int) -> None:
        """Batch `n` taken in or dropped: what is listed with it is done (or gone elsewhere)."""
        self.book.ledger.writing().execute("DELETE FROM batch_twins WHERE n = ?", (n,))


def _short(key: bytes) -> int:
    return int.from_bytes(key[:8], "big")
