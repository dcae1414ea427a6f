"""A run's `--redo`: the lines chosen and committed before anything is sent, what is said of
them, and the older answers moved out at the end (`pipeline.output.redo`, `.supersede`)."""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.account.usage import Usage
from pipeline.input.stdin import named
from pipeline.output.redo import (
    TABLE,
    chosen_before,
    failed_count,
    is_redone,
    release_unread,
    select,
    waiting_count,
)
from pipeline.output.supersede import compact, old_lines

if TYPE_CHECKING:
    from pipeline.output.ledger import Ledger
    from pipeline.run.runner import Run
    from pipeline.settings import Settings


def choose(settings: Settings, ledger: Ledger, usage: Usage, started: float) -> list[str]:
    """Commit what `settings.redo` chooses, with the job as it is now; returns what to say."""
    redo = settings.redo
    if redo is None:
        return []
    verdict = None
    if settings.verdict is not None:
        from pipeline.send.verdict import compile_verdict

        verdict = compile_verdict(settings.verdict, settings.request, where=str(settings.job_file))
    db = ledger.writing()
    db.execute(TABLE)
    waiting = chosen_before(db)
    chosen = select(
        settings.folder / "results.jsonl",
        int(ledger.get("results_offset") or 0),
        redo,
        counted=lambda custom_id: custom_id not in waiting,
        failures=((key, kind, record) for _, key, kind, record in ledger.failures()),
        verdict=verdict,
        prices=settings.prices,
        mine=None if settings.shard is None else settings.shard.owns,
    )
    db.executemany("INSERT OR REPLACE INTO redo (id, reason, start, length) VALUES (?, ?, ?, ?)", chosen.rows)
    ledger.drop_done(row[0] for row in chosen.rows)
    # An answer a redo replaces is no longer a result (its new one will be): one per id.
    usage.outcomes["succeeded"] = max(usage.outcomes.get("succeeded", 0) - len(chosen.rows), 0)
    when = dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds")
    usage.redos.append({"what": redo.what, **chosen.record(when, ledger.changes)})
    ledger.put("job", settings.fingerprint())  # the job is the new one from now on
    ledger.put("usage", usage.state())
    ledger.commit()
    said = [w for w in [chosen.warning(redo)] if w]
    if ledger.changes:
        said.append(f"--redo: the job changed ({'; '.join(ledger.changes)}); recorded in usage.json")
        if settings.tier == "batch":
            from pipeline.batch.notes import changed_note

            said += [n for n in [changed_note(ledger, settings.folder)] if n]
    if chosen.lines:
        why = ", ".join(f"{reason} {n:,}" for reason, n in chosen.reasons.items())
        said.append(
            f"--redo {redo.what}: {chosen.lines:,} line(s) go again ({why}); the answers they replace "
            "move to superseded.jsonl"
        )
    else:
        said.append(f"--redo {redo.what}: nothing to redo in {settings.folder}")
    if waiting:
        said.append(f"{len(waiting):,} line(s) an earlier --redo chose and did not get go again too")
    return said


def fresh_ids(ledger: Ledger) -> Callable[[str], bool] | None:
    """Whether a line's answer must be new (a redo chose it): None where no redo waits."""
    db = ledger.reading()
    if not waiting_count(db):
        return None
    return lambda custom_id: is_redone(db, custom_id)


def settle(run: Run) -> None:
    """At the run's end: the older answers of lines answered anew moved to superseded.jsonl."""
    writer = run.writer
    if writer.broken is not None or writer.behind:
        return  # (the next run's repair moves them)
    try:
        compact(run.settings.folder, run.ledger)
    except (OSError, sqlite3.Error) as e:
        writer.fail(e)


def release(run: Run) -> None:
    """Once the whole input was read: the ids a redo chose that the input no longer has keep
    their earlier answer, and no run waits for them any more. Not at the batch tier, where
    such a line may still be in a batch, whose answer replaces the older one when it comes."""
    if run.settings.tier == "batch":
        return
    run.released = release_unread(run.ledger)
    if run.released:
        run.ledger.commit()


def released_note(run: Run) -> str | None:
    if not run.released:
        return None
    return (
        f"{run.released:,} line(s) a --redo chose are no longer in {named(run.settings.input)}: they keep "
        "their earlier answer in results.jsonl and are not sent again"
    )


def waiting_note(run: Run) -> tuple[int, str | None]:
    """The older answers results.jsonl holds beside the index's ids (a redo's lines not
    answered anew, or not moved out yet), and a note of those whose redo failed."""
    with contextlib.suppress(sqlite3.Error):
        old = old_lines(run.settings.folder, run.ledger)
        waiting = waiting_count(run.ledger.reading())
        note = (
            f"{waiting:,} redone line(s) got no new answer and keep their earlier one in "
            "results.jsonl; a later run tries them again"
        )
        return old, note if waiting else None
    return 0, None


def kept(run: Run) -> tuple[int, int]:
    """The ids a redo chose that keep their earlier answer (no new one yet), and of them those
    whose request failed: each is one result, neither a failure nor pending."""
    with contextlib.suppress(sqlite3.Error):
        db = run.ledger.reading()
        return waiting_count(db), failed_count(db)
    return 0, 0
