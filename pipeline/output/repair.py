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
from pipeline.output.folder import ERRORS, RESULTS, remove, write_lines
from pipeline.output.ledger import OPEN_RUN, Ledger
from pipeline.prices import Price


def valid_result(raw: bytes) -> dict[str, Any] | None:
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
    from pipeline.output.supersede import compact, resume, supersede_older

    try:
        resume(folder, ledger)  # before: a compaction killed after its rename left the file shorter
        newer: set[str] = set()
        found = _reconcile(folder, ledger, books, newer)
        compact(folder, ledger)  # the old answers of ids a killed redo run answered anew
        while newer:  # (ids answered anew an index lost knew of: the newest kept, the older moved)
            newer = supersede_older(folder, ledger, newer)
        return found
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            ledger.rollback()
        raise


def _reconcile(folder: Path, ledger: Ledger, books: Books, newer: set[str]) -> tuple[int, int]:
    """`newer` gets the ids with two different answers (a redo's, its index lost): both kept
    for now; a copy of the same line is cut."""
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
    if offset == 0:  # (an index begun again, or deleted: what redos replaced counted again)
        _count_superseded(folder, books)
    indexed = 0
    bad: list[tuple[int, int]] = []
    again: dict[str, list[tuple[int, bytes]]] = {}  # (the later lines of an id indexed already)
    if size > offset:
        with path.open("rb") as f:
            f.seek(offset)
            pos = offset
            for raw in f:
                start, pos = pos, pos + len(raw)
                obj = valid_result(raw)
                if obj is None:
                    bad.append((start, pos))
                    continue
                if not ledger.add_done([obj["custom_id"]]):
                    again.setdefault(obj["custom_id"], []).append((start, raw))
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
    if again:
        bad.extend(_answered_anew(path, again, books, newer))
    if bad:
        cut_ranges(path, sorted(bad))
    ledger.put("results_offset", path.stat().st_size if path.exists() else 0)
    ledger.put("usage", books.usage.state())
    ledger.commit()
    return indexed, len(bad)


def _count_superseded(folder: Path, books: Books) -> None:
    """The answers redos replaced, paid for: counted again where the index is rebuilt."""
    from pipeline.output.supersede import SUPERSEDED

    if not (folder / SUPERSEDED).exists():
        return
    with (folder / SUPERSEDED).open("rb") as f:
        for raw in f:
            obj = valid_result(raw)
            if obj is not None and obj.get("reused") is not True:
                books.recovered(obj["response"]["body"], count_outcome=False)


def _answered_anew(
    path: Path, again: dict[str, list[tuple[int, bytes]]], books: Books, newer: set[str]
) -> list[tuple[int, int]]:
    """The later lines of ids indexed already: a copy of one of the id's lines before it is cut
    (written twice); a different answer is a redo's whose index was lost (or deleted): paid,
    counted, and kept, the last as the newest (the ids in `newer`; each earlier one moves out
    once). Returns the ranges to cut."""
    from pipeline.output.supersede import locate

    first = locate(path, set(again))
    cut: list[tuple[int, int]] = []
    with path.open("rb") as f:
        for custom_id, lines in again.items():
            where = first.get(custom_id)
            kept: set[bytes] = set()
            if where is not None:
                f.seek(where[0])
                kept.add(f.read(where[1]))
            for start, raw in lines:
                if where is None or where[0] == start or raw in kept:
                    cut.append((start, start + len(raw)))
                    continue
                kept.add(raw)
                newer.add(custom_id)
                obj = orjson.loads(raw)
                if obj.get("reused") is True:
                    books.recovered_reused(obj["response"]["body"], count_outcome=False)
                else:
                    books.recovered(obj["response"]["body"], count_outcome=False)
    return cut


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


def cut_ranges(path: Path, bad: list[tuple[int, int]]) -> None:
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
