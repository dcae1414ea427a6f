"""The repair after a crash: the folder's index brought up to what results.jsonl holds (lines
it has not seen indexed, torn or duplicate lines cut), before a run starts, or before a merge
takes a shard whose last run was killed (`repair`, which also rewrites errors.jsonl from the
ledger). A run marks in the ledger that it began (`open_run_mark`) and clears that with its
end record, so a folder whose last run did not end says so.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import socket
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from pipeline.account.books import Books
from pipeline.jobfile import Price
from pipeline.output.folder import ERRORS, RESULTS, remove, write_lines
from pipeline.output.ledger import OPEN_RUN, Ledger


def _valid_result(raw: bytes) -> dict[str, Any] | None:
    """A whole, well-formed result line, parsed; None for anything torn."""
    if not raw.endswith(b"\n"):
        return None
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("custom_id"), str):
        return None
    response = obj.get("response")
    if not isinstance(response, dict) or not isinstance(response.get("body"), dict):
        return None
    return obj


def reconcile(folder: Path, ledger: Ledger, books: Books) -> tuple[int, int]:
    """Bring the index up to results.jsonl after any crash: index the lines it has not seen,
    and cut out torn or duplicate lines. Returns (lines indexed, lines removed). All of it is
    committed at once or none of it: indexed ids without the offset that covers their lines
    would make the next repair cut those lines as copies."""
    try:
        return _reconcile(folder, ledger, books)
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            ledger.rollback()
        raise


def _reconcile(folder: Path, ledger: Ledger, books: Books) -> tuple[int, int]:
    path = folder / RESULTS
    offset = int(ledger.get("results_offset") or 0)
    size = path.stat().st_size if path.exists() else 0
    rebuild = size < offset or (offset == 0 and ledger.done_count > 0)
    if rebuild:
        # The file is shorter than what the index covers: rebuild the index from it.
        ledger.clear_done()
        books.usage.models.clear()
        books.usage.reused, books.usage.reused_cost, books.usage.reused_unpriced = 0, 0.0, 0
        offset = 0
    indexed = 0
    bad: list[tuple[int, int]] = []
    if size > offset:
        with path.open("rb") as f:
            f.seek(offset)
            pos = offset
            for raw in f:
                start, pos = pos, pos + len(raw)
                obj = _valid_result(raw)
                if obj is None or not ledger.add_done([obj["custom_id"]]):
                    bad.append((start, pos))
                    continue
                indexed += 1
                ledger.drop_failed([obj["custom_id"]])
                body = obj["response"]["body"]
                if obj.get("reused") is True:  # taken from the answer cache: not paid
                    bought = obj.get("cost_not_spent")  # (what it cost when bought, where known)
                    if not isinstance(bought, int | float) or isinstance(bought, bool):
                        bought = None
                    books.recovered_reused(body, count_outcome=not rebuild, bought=bought)
                else:
                    books.recovered(body, count_outcome=not rebuild)
    if bad:
        _cut(path, bad)
    ledger.put("results_offset", path.stat().st_size if path.exists() else 0)
    ledger.put("usage", books.usage.state())
    ledger.commit()
    return indexed, len(bad)


def open_run_mark(started: float, prices: Mapping[str, Price]) -> dict[str, Any]:
    """What the ledger's `open_run` holds while a run goes: when and where it began, and the
    prices it costs answers by (a repair after it is killed costs the answers it finds alike)."""
    return {
        "started": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
        "by": f"pid {os.getpid()} on {socket.gethostname()}",
        "prices": {model: [price.prompt, price.completion] for model, price in prices.items()},
    }


def repair(folder: Path, ledger: Ledger, books: Books) -> tuple[int, int, int]:
    """The repair a run makes at its start, for a folder whose last run was killed: results the
    index has not seen are indexed, torn or duplicate lines cut, and errors.jsonl rewritten
    from the ledger (what is failed now: a killed run had rewritten it, then appended). The
    run is no longer open. Returns (lines indexed, lines cut, failures listed)."""
    indexed, cut = reconcile(folder, ledger, books)
    listed = write_lines(folder / ERRORS, (record for *_, record in ledger.failures()), suffix="repair")
    ledger.put(OPEN_RUN, None)
    ledger.commit()
    return indexed, cut, listed


def mark_prices(mark: Any) -> dict[str, Price]:
    """The prices an `open_run` mark holds (none in a mark that holds none)."""
    prices = mark.get("prices") if isinstance(mark, dict) else None
    if not isinstance(prices, dict):
        return {}
    return {
        model: Price(*pair) for model, pair in prices.items() if isinstance(pair, list) and len(pair) == 2
    }


def _cut(path: Path, bad: list[tuple[int, int]]) -> None:
    """Remove the byte ranges `bad` from the file, so that a crash at any moment leaves
    either the old file or the new one, never a file missing good lines."""
    size = path.stat().st_size
    if len(bad) == 1 and bad[0][1] == size:
        # Only the last line is bad (a torn write): one truncate, nothing else moves.
        with path.open("r+b") as f:
            f.truncate(bad[0][0])
            os.fsync(f.fileno())
        return
    tmp = path.with_name(f".{path.name}.repair")
    try:
        with path.open("rb") as src, tmp.open("wb") as dst:
            pos = 0
            for start, end in [*bad, (size, size)]:
                remaining = start - pos
                while remaining > 0:
                    block = src.read(min(remaining, 1 << 20))
                    dst.write(block)
                    remaining -= len(block)
                src.seek(end)
                pos = end
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise
