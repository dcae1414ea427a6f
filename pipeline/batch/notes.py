"""What a run says of a folder's batches still at the provider, where it does not follow them:
a synchronous run into the folder (it sends their lines again), and a run started with
--fresh (the earlier run's book goes aside with its files)."""

from __future__ import annotations

from pathlib import Path

from pipeline.batch.book import CREATING, RUNNING
from pipeline.output.folder import LEDGER
from pipeline.output.ledger import Ledger


def live_batches(ledger: Ledger) -> int:
    """How many batches of the folder's book are at the provider, made or maybe made (0 where
    it has none): a synchronous run into it says so, since it sends their lines again. (One
    staged and never submitted is not: the next batch run stages again what is not done.)"""
    db = ledger.reading()
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'batches'").fetchone() is None:
        return 0
    return int(
        db.execute("SELECT count(*) FROM batches WHERE state IN (?, ?)", (CREATING, RUNNING)).fetchone()[0]
    )


def changed_note(ledger: Ledger, folder: Path) -> str | None:
    """What a --redo run at the batch tier that changed the job says of the lines in batches
    at the provider: made with the job as it was, they are answered so (None: there are
    none). `pipeline cancel` stops them: the lines not run yet go again, made anew. (Batches
    staged and not submitted are made again with the new job: `Book.forget_staged`.)"""
    db = ledger.reading()
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'batches'").fetchone() is None:
        return None
    sent = db.execute(
        "SELECT coalesce(sum(lines), 0) FROM batches WHERE state IN (?, ?)", (CREATING, RUNNING)
    ).fetchone()[0]
    if not sent:
        return None
    return (
        f"--redo at the batch tier: {int(sent):,} line(s) in batches at the provider are answered with "
        f"the job as it was (`pipeline cancel {folder}` first: those not run yet go again with the new one)"
    )


def live_note(ledger: Ledger, folder: Path) -> str | None:
    """What a synchronous run into a folder with live batches says before it sends."""
    live = live_batches(ledger)
    if not live:
        return None
    return (
        f"pipeline: {live:,} batch(es) of this folder are still at the provider (--tier batch): their "
        f"lines are sent again now, and paid twice; run with --tier batch to take them in, or "
        f"`pipeline cancel {folder}` first"
    )


def aside_note(previous: Path) -> str | None:
    """What a run started with --fresh says of the batches the earlier run left at the
    provider (made, or maybe made): they go on and are paid for, and their book went aside
    with the rest, where `pipeline cancel` reaches them."""
    if not (previous / LEDGER).exists():
        return None
    ledger = Ledger(previous / LEDGER)
    try:
        db = ledger.reading()
        if (
            db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'batches'").fetchone()
            is None
        ):
            return None
        made = int(
            db.execute("SELECT count(*) FROM batches WHERE state IN (?, ?)", (CREATING, RUNNING)).fetchone()[
                0
            ]
        )
    finally:
        ledger.close(commit=False)
    if not made:
        return None
    return (
        f"pipeline: --fresh: {made:,} batch(es) of the earlier run are still at the provider, and are "
        f"paid for as they finish; their book is in {previous}: `pipeline cancel {previous}` cancels "
        "them (this run sends their lines again)"
    )
