"""What the batch tier did, for the end of a run and its reports: batches made, lines a batch,
how long they waited, how they ended, what went again, and what the answers cost at the batch
price beside what they would have cost now (the saving a person came for).

Each batch's figures are kept in its row of the book (its `info`), written in the very commit
that marks it taken, so they are counted once whatever is killed when; the folder's figures
are summed from the book (`figures`), which `pipeline report OUT` reads as the run's end does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import orjson

from pipeline.account.cost import answer_cost, answering_model, price_for, priced
from pipeline.account.usage import answer_tokens, cache_tokens
from pipeline.job import Success
from pipeline.output.folder import LEDGER
from pipeline.output.ledger import Ledger
from pipeline.prices import Price
from pipeline.send.batchapi import ENDED

TAKEN_AT = "taken_at"  # (an info key of ours: when the batch was taken in, epoch seconds)


class Spent:
    """One batch's answers as they are written: their cost at the batch price, as the books
    count it (the server's `usage.cost`, else the table's batch price), and the same answers
    at the synchronous price, where the table has one."""

    def __init__(self, batch_prices: Mapping[str, Price], sync_prices: Mapping[str, Price]) -> None:
        self.batch_prices, self.sync_prices = batch_prices, sync_prices
        self.answers = self.costed = self.sync_priced = 0
        self.bounded = 0  # answers costed at the synchronous price: no batch price known
        self.cost = self.sync_cost = 0.0

    def add(self, successes: Sequence[Success]) -> None:
        batch_prices, sync_prices = self.batch_prices, self.sync_prices
        for success in successes:
            body, model = success.reply.body, success.request.model
            self.answers += 1
            cost, source = answer_cost(body, batch_prices, model)
            # (the tables looked at only where they hold something: every answer comes here)
            price: Price | None = None
            if sync_prices:
                answering = answering_model(body, model)
                price = price_for(sync_prices, answering) or price_for(sync_prices, model)
            if cost is not None:
                self.cost += cost
                self.costed += 1
                # A model `[prices]` gives no batch price is costed at its synchronous one, the
                # very entry (`tier_prices`): an upper bound, which tells no saving.
                if source == "price table" and price is not None:
                    answering = answering_model(body, model)
                    batch = price_for(batch_prices, answering) or price_for(batch_prices, model)
                    self.bounded += batch is price
            if price is not None:
                prompt, completion, _ = answer_tokens(body)
                usage = body.get("usage")
                cached, written = cache_tokens(usage) if isinstance(usage, dict) else (0, 0)
                self.sync_cost += priced(price, prompt, completion, cached, written)
                self.sync_priced += 1

    def state(self) -> dict[str, Any]:
        return {
            "answers": self.answers,
            "cost": self.cost,
            "costed": self.costed,
            "bounded": self.bounded,
            "sync_cost": self.sync_cost,
            "sync_priced": self.sync_priced,
        }


def _rows(ledger: Ledger) -> list[Any]:
    db = ledger.reading()
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'batches'").fetchone() is None:
        return []
    return db.execute(
        "SELECT state, batch_id, lines, at, info FROM batches WHERE state != 'filling'"
    ).fetchall()


def figures(*ledgers: Ledger, refused: int = 0) -> dict[str, Any] | None:
    """usage.json's `batches`: the folder's batches summed from its book (None: it has none);
    several books (a merge of shards, each with its own) are summed as one.
    `refused`: result lines refused (an id not sent in that batch, or sent back twice)."""
    rows = [row for ledger in ledgers for row in _rows(ledger)]
    if not rows:
        return None
    made = [row for row in rows if row[1] is not None]
    sizes = [int(row[2] or 0) for row in made]
    ended: dict[str, int] = {}
    waits: list[float] = []
    sums = dict.fromkeys(
        ("again", "now", "answers", "cost", "costed", "bounded", "sync_cost", "sync_priced"), 0.0
    )
    for state, _, _, at, raw in made:
        info = orjson.loads(raw) if raw is not None else {}
        if state in ("taken", "dropped"):
            # (a provider's own word is outside text, which the reports would have to escape)
            status = info.get("status")
            status = status if status in ENDED else "ended otherwise"
            ended[status] = ended.get(status, 0) + 1
        taken_at = info.get(TAKEN_AT)
        if isinstance(taken_at, int | float) and isinstance(at, int | float):
            waits.append(max(float(taken_at) - float(at), 0.0))
        for key in sums:
            value = info.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool):
                sums[key] += value
    answers = int(sums["answers"])
    cost = round(sums["cost"], 10) if sums["costed"] else None
    # The saving is told only where every answer's synchronous price is known: half a figure
    # would pass for the whole.
    sync = round(sums["sync_cost"], 10) if answers and sums["sync_priced"] == answers else None
    waits.sort()
    return {
        "made": len(made),
        "lines": sum(sizes),
        "lines_per_batch": {
            "min": min(sizes, default=0),
            "mean": round(sum(sizes) / len(sizes), 1) if sizes else 0,
            "max": max(sizes, default=0),
        },
        "running": sum(1 for row in made if row[0] in ("creating", "running")),
        "staged": sum(1 for row in rows if row[0] == "staged"),
        # Marked creating before the call that makes them, and no id noted after it: a run
        # stopped (killed) there; made or not, the next run finds out (by their tag).
        "submitting": sum(1 for row in rows if row[0] == "creating" and row[1] is None),
        "ended": dict(sorted(ended.items())),
        "refused_by_provider": sum(1 for row in rows if row[0] == "dropped" and row[1] is None),
        "waited_seconds": {
            "min": round(waits[0], 1) if waits else None,
            "median": round(waits[len(waits) // 2], 1) if waits else None,
            "max": round(waits[-1], 1) if waits else None,
        },
        "lines_again": int(sums["again"]),
        "lines_sent_now": int(sums["now"]),
        "result_lines_refused": refused,
        "answers": answers,
        "answers_costed": int(sums["costed"]),
        "answers_at_sync_price": int(sums["bounded"]),
        "cost": cost,
        "sync_cost": sync,
        # (and only where every answer's cost is known: a part of it would pass for a saving)
        "saved": round(sync - cost, 10)
        if sync is not None and cost is not None and sums["costed"] == answers and not sums["bounded"]
        else None,
    }


def shards_figures(folders: Sequence[Path], *, refused: int = 0) -> dict[str, Any] | None:
    """`figures` of a set of shards' folders, their books summed (`pipeline merge`, and
    `pipeline report OUT` of shards): each shard's batches are in its own book."""
    with contextlib.ExitStack() as opened:
        ledgers = [
            opened.enter_context(contextlib.closing(Ledger(folder / LEDGER)))
            for folder in folders
            if (folder / LEDGER).exists()
        ]
        return figures(*ledgers, refused=refused)
