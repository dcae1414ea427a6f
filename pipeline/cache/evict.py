"""The answer cache kept under its bound (`max_gb`): over it, a flush deletes the least
recently used answers, their sizes summed, until the total is at the low mark, 10 % under the
bound (so that the next few flushes evict nothing).

Counted, not estimated: the first version deleted as many rows as the mean row size said, and
lowered its target 10 % each time that fell short. The oldest answers may be much shorter than
the newest (each batch then fell short: a cache 0.3 % over a 1 MB bound was cut to 260 kB) or
much longer (one batch took every long one). Answers bought since, paid for, lost.
"""

from __future__ import annotations

import sqlite3

LOW_WATER = 0.9  # an eviction brings the total this far under the bound
MOST = 4096  # rows a flush may delete: each transaction stays short

_BYTES = "SELECT value FROM meta WHERE name = 'bytes'"
_OLDEST = "SELECT id, size FROM answers ORDER BY used LIMIT ?"  # (the index of use, in order)


def largest(bound: int) -> int:
    """The most an answer may count for under `bound`: one bigger would evict every other
    answer, then itself (one 2 MB answer emptied a 1 MB cache). It is not kept."""
    return int(bound * LOW_WATER)


def evict(db: sqlite3.Connection, bound: int) -> None:
    """In `db`'s open write transaction: over `bound`, delete the least recently used rows
    until the total is at the low mark, or `MOST` rows are gone. Once under the bound, a row
    whose going would take the total past the low mark is kept, and the eviction ends there:
    the mark is slack for the next flushes, not worth a long answer (six short ones 1 byte
    short of it took a 3,700-byte one with them)."""
    (total,) = db.execute(_BYTES).fetchone()
    if total <= bound:
        return
    low = int(bound * LOW_WATER)
    doomed: list[tuple[int]] = []
    oldest = db.execute(_OLDEST, (MOST,))
    for id_, size in oldest:
        if total <= low or (total <= bound and total - size < low):
            break  # (under the bound, a row that would take the total past the low mark stays)
        doomed.append((id_,))
        total -= size
    oldest.close()
    db.executemany("DELETE FROM answers WHERE id = ?", doomed)
