"""Going again: the lines of a batch taken in that are to be tried again, read back from the
batch's own staged file (no second read of the input, images inlined already), either copied
into new batches (tries + 1), or, `--then sync`, sent now (`pipeline.batch.now`).

Which lines: those `taking` (the intake's temporary table, one row per line of the batch met)
marks AGAIN or NOW; one sent now with the tries its batches spent (`spent`), and of those the
answers that broke the verdict (`broke`), which its requests' attempts count on from.
"""

from __future__ import annotations

from collections.abc import Callable

import orjson

from pipeline.batch.book import Batch, Book
from pipeline.batch.now import SendNow
from pipeline.batch.stage import Files, pictured
from pipeline.job import Outcome, Request, SentNow
from pipeline.output.ledger import Ledger

AGAIN, NOW = 1, 2  # `taking.again`: in a new batch; sent now
TAKING = (
    "CREATE TEMP TABLE IF NOT EXISTS taking "
    "(id TEXT PRIMARY KEY, again INTEGER, spent INTEGER, broke INTEGER) WITHOUT ROWID"
)
SEND_EVERY = 1024  # lines sent now at once, at most


def marked(ledger: Ledger, how: int) -> bool:
    db = ledger.reading()
    return db.execute("SELECT 1 FROM taking WHERE again = ? LIMIT 1", (how,)).fetchone() is not None


async def stage_again(
    book: Book, ledger: Ledger, batch: Batch, files: Files
) -> list[tuple[int, int, int, float]]:
    """The lines to go again, copied into new batch files, left filling: (n, lines, bytes,
    worst case) of each, to be staged in the commit that takes this batch."""
    if not marked(ledger, AGAIN):
        return []
    db = ledger.reading()
    files.mark_staged = False
    # (what each line may cost, as the batch's worst case was reckoned: its share of it)
    share = batch.reserved / batch.lines if batch.lines else 0.0
    try:
        with book.path(batch.n).open("rb") as f:
            for data in f:
                custom_id = orjson.loads(data).get("custom_id")
                row = db.execute("SELECT again, spent FROM taking WHERE id = ?", (custom_id,)).fetchone()
                if row is None or row[0] != AGAIN:
                    continue
                listed = book.listed(batch.n, custom_id)
                assert listed is not None
                await files.put(
                    batch.model,
                    custom_id,
                    listed.line,
                    row[1] + 1,  # (tries spent, and the new batch's)
                    listed.metadata,
                    data,
                    share,
                    apart=files.text_only and pictured(data),  # (kept apart again, as staged)
                )
        await files.finish()
    finally:
        files.abandon()  # (what a failure left open: left filling, forgotten by the next run)
    return files.cut


async def send_now(
    book: Book, ledger: Ledger, batch: Batch, now: SendNow, write: Callable[[list[Outcome]], bool]
) -> bool:
    """The lines marked to be sent now, a run of them at a time, their outcomes written;
    False when the run stopped before all were done (then the batch is not taken)."""
    if not marked(ledger, NOW):
        return True
    db = ledger.reading()
    requests: list[Request] = []

    async def send() -> bool:
        outcomes = await now.send(requests) if requests else []
        requests.clear()
        return outcomes is not None and write(outcomes)

    with book.path(batch.n).open("rb") as f:
        for data in f:
            line = orjson.loads(data)
            custom_id = line.get("custom_id")
            row = db.execute("SELECT again, spent, broke FROM taking WHERE id = ?", (custom_id,)).fetchone()
            listed = book.listed(batch.n, custom_id) if row is not None and row[0] == NOW else None
            if listed is None:
                continue
            body = line["body"]
            stream = isinstance(body, dict) and body.get("stream") is True
            payload = orjson.dumps(body)
            # (the tries its batches spent, counted on from)
            spent, broke = row[1] or 0, row[2] or 0
            requests.append(
                SentNow(
                    custom_id,
                    listed.line,
                    payload,
                    listed.metadata,
                    batch.model,
                    stream,
                    spent=spent,
                    broke=broke,
                )
            )
            if len(requests) >= SEND_EVERY and not await send():
                return False
    return await send()
