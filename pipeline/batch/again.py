"""Going again: the lines of a batch taken in that are to be tried again, read back from the
batch's own staged file (no second read of the input, images inlined already), either copied
into new batches (tries + 1), or, `--then sync`, sent now (`pipeline.batch.now`).

Which lines: those `taking` (the intake's temporary table, one row per line of the batch met)
marks AGAIN or NOW; one sent now with the tries its batches spent (`spent`), and of those the
answers that broke the verdict (`broke`), which its requests' attempts count on from.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import orjson

from pipeline.batch.book import Batch, Book, Listed
from pipeline.batch.now import SendNow
from pipeline.batch.stage import Files, batch_line, pictured
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
    book: Book, ledger: Ledger, batch: Batch, files: Files, loose: Mapping[str, list[Listed]]
) -> list[tuple[int, int, int, float]]:
    """The lines to go again, copied into new batch files, left filling: (n, lines, bytes,
    worst case) of each, to be staged in the commit that takes this batch. `loose`: twins
    to go themselves (`pipeline.batch.twins`), by their leader's id: a copy of its line
    each, under their own id, at their first try."""
    if not marked(ledger, AGAIN) and not loose:
        return []
    db = ledger.reading()
    files.mark_staged = False
    # (what each line may cost, as the batch's worst case was reckoned: its share of it)
    share = batch.reserved / batch.lines if batch.lines else 0.0
    try:
        with book.path(batch.n).open("rb") as f:
            for data in f:
                obj = orjson.loads(data)
                custom_id = obj.get("custom_id")
                for twin in loose.get(custom_id, ()):
                    await files.put(
                        batch.model,
                        twin.custom_id,
                        twin.line,
                        1,
                        twin.metadata,
                        batch_line(twin.custom_id, orjson.dumps(obj["body"])),
                        share,
                        apart=files.text_only and pictured(data),
                    )
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
    book: Book,
    ledger: Ledger,
    batch: Batch,
    now: SendNow,
    write: Callable[[list[Outcome]], bool],
    loose: Mapping[str, list[Listed]],
) -> bool:
    """The lines marked to be sent now, a run of them at a time, their outcomes written;
    False when the run stopped before all were done (then the batch is not taken). `loose`:
    twins sent now too, as themselves (the synchronous tier's sharing sends each key once)."""
    if not marked(ledger, NOW) and not loose:
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
            body = line["body"]
            stream = isinstance(body, dict) and body.get("stream") is True
            payload = orjson.dumps(body)
            for twin in loose.get(custom_id, ()):
                requests.append(
                    SentNow(twin.custom_id, twin.line, payload, twin.metadata, batch.model, stream)
                )
            row = db.execute("SELECT again, spent, broke FROM taking WHERE id = ?", (custom_id,)).fetchone()
            listed = book.listed(batch.n, custom_id) if row is not None and row[0] == NOW else None
            if listed is None:
                if len(requests) >= SEND_EVERY and not await send():
                    return False
                continue
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
