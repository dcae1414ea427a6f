"""How a run ends: everything written down, the exit status and its note, the run's record
in the ledger, and the reports (usage.json, report.md, report.html) drawn from it. A folder
that cannot be written any more still ends in a record and a note that says what it kept.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import time
from typing import TYPE_CHECKING, Any

import anyio

from pipeline.account.usage import Usage
from pipeline.batch.tally import figures
from pipeline.input.source import count_lines
from pipeline.output.device import unwritable
from pipeline.output.ledger import OPEN_RUN
from pipeline.report.markdown import usage_document, write_reports
from pipeline.run.redoing import kept as redo_kept
from pipeline.run.redoing import settle as settle_redo
from pipeline.run.redoing import waiting_note
from pipeline.run.summary import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_STOPPED,
    Summary,
    exit_status,
    nothing_to_do,
    pending_lines,
)

if TYPE_CHECKING:
    from pipeline.run.runner import Run


def _unwritable_note(run: Run, error: BaseException) -> str:
    """How a run that could not write its folder ends: what it kept, and what it lost."""
    writer = run.writer
    old, _ = waiting_note(run)  # (the older answers of redone lines, not moved out yet)
    kept = writer.results_kept + old
    return unwritable(run.settings.folder, error, kept=kept, unwritten=writer.answers_lost)


async def close(run: Run) -> int:
    """Write everything down; returns how many lines errors.jsonl lists now."""
    run.progress.close()
    writer = run.writer
    try:
        await writer.settle()
        # Not after a failed write: a rollback may have taken back ids the reader noted.
        if run.counts.finished and writer.broken is None:
            try:
                run.ledger.forget_stale(run.counts.read)
            except sqlite3.Error as e:
                with contextlib.suppress(sqlite3.Error):
                    run.ledger.rollback()
                writer.fail(e)
        settle_redo(run)  # the older answers of lines answered anew: to superseded.jsonl
        try:
            return writer.rewrite_errors()
        except (OSError, sqlite3.Error) as e:  # the folder is full: the ledger still knows
            writer.fail(e)
            with contextlib.suppress(sqlite3.Error):
                return run.ledger.count_failed()
            return run.ledger.failed_count
    finally:
        with contextlib.suppress(OSError):
            writer.close()
        if run.reuse is not None:
            with anyio.CancelScope(shield=True):  # (a second Ctrl-C too: the answers queued, kept)
                await anyio.to_thread.run_sync(run.reuse.close)


def finish(run: Run, failed_now: int) -> Summary:
    settings, control, counts, usage = run.settings, run.control, run.counts, run.usage
    wall = time.time() - run.started
    if counts.total is None:
        counts.total = counts.read if counts.finished else count_lines(settings.input)
    delta = usage.outcomes - run.before
    total = counts.total
    pending = pending_lines(counts, control, run.writer.written)
    code, note = exit_status(
        control, pending=pending, failed_now=failed_now, errors_file=settings.folder / "errors.jsonl"
    )
    idle = nothing_to_do(counts, source=settings.input, shard=settings.shard)
    if code == EXIT_OK and idle is not None:
        note = idle
    if run.writer.broken is not None and code != EXIT_INTERRUPTED:
        code, note = EXIT_STOPPED, _unwritable_note(run, run.writer.broken)
    _, waiting = waiting_note(run)
    if waiting is not None:
        note = f"{note}; {waiting}"
    if run.follower is not None:  # at --tier batch: what is left running, and refused
        note = run.follower.amend(note, settings.folder)
    note = run.redact.text(note)
    record: dict[str, Any] = {
        "started": dt.datetime.fromtimestamp(run.started, dt.UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(wall, 3),
        "succeeded": delta.get("succeeded", 0),
        "failed": delta.get("failed", 0),
        "invalid_input": delta.get("invalid_input", 0),
        "skipped": counts.skipped,
        **({"shard": str(settings.shard), "elsewhere": counts.elsewhere} if settings.shard else {}),
        "pending": pending,
        "lines": total,
        "attempts": usage.attempts - run.attempts_before,
        **({"reused": usage.reused - run.reused_before} if usage.reused > run.reused_before else {}),
        "rate_cuts": run.finder.cuts,
        "latency_cuts": run.finder.latency_cuts,
        "exit": code,
        "note": note,
        **({"tier": "batch"} if settings.tier == "batch" else {}),
    }
    if run.pacer.request_rate is not None:
        record["paced_at_rpm"] = round(run.pacer.request_rate * 60)
    scopes = run.gate.scopes
    models = {
        model: round(rate * 60)
        for model, (rate, _, _) in scopes.paces().items()
        if rate and model in scopes.tags  # a limit given for a model no line named paced nothing
    }
    if models:
        record["models_paced_at_rpm"] = models
    usage.timeline.finish()
    usage.runs.append(record)
    try:
        run.ledger.put("usage", _usage_to_keep(run))
        run.ledger.put(OPEN_RUN, None)
        run.ledger.commit()
    except sqlite3.Error as e:
        run.writer.fail(e)
        if code != EXIT_INTERRUPTED:
            code, note = EXIT_STOPPED, _unwritable_note(run, run.writer.broken or e)
            record.update(exit=code, note=note)
    # An id a redo chose keeps its earlier answer until the new one comes: a result, once.
    left, failed_kept = redo_kept(run)
    state = {
        "succeeded": run.writer.results_kept + left,
        **({"kept_after_failed_redo": failed_kept} if failed_kept else {}),
        "failed": failed_now - failed_kept,
        "pending": None if pending is None else max(pending - (left - failed_kept), 0),
        "lines": total,
    }
    batches = None
    with contextlib.suppress(sqlite3.Error):  # (a folder that fails: its reports go without them)
        batches = figures(run.ledger, refused=usage.answers.get("refused", 0))
    doc = usage_document(usage, state=state, folder=settings.folder, batches=batches)
    try:
        write_reports(settings.folder, doc, run.redact)
    except OSError as e:
        code = EXIT_STOPPED
        note = f"{note}; and usage.json, report.md and report.html could not be written ({e.strerror or e})"
        # The run's record says how it ended, so the next report tells the same story.
        record.update(exit=code, note=note)
        with contextlib.suppress(sqlite3.Error):
            run.ledger.put("usage", _usage_to_keep(run))
            run.ledger.commit()
    return Summary(
        exit_code=code,
        message=note,
        output=settings.folder,
        succeeded=delta.get("succeeded", 0),
        failed=delta.get("failed", 0),
        invalid_input=delta.get("invalid_input", 0),
        skipped=counts.skipped,
        pending=pending,
        usage=doc,
        own_model=run.parser.own_model,
        reused=usage.reused - run.reused_before,
    )


def _usage_to_keep(run: Run) -> dict[str, Any]:
    """The usage to commit with the run's record. When the index lacks lines this run
    wrote (a checkpoint failed), the usage committed with the index, which the next run's
    repair adds those lines to: committing ours would count them twice."""
    if not run.writer.behind:
        return run.usage.state()
    kept = Usage.from_state(run.ledger.get("usage"))
    kept.runs = run.usage.runs
    return kept.state()
