"""`pipeline report OUT`: usage.json, report.md and report.html again, from what a folder
holds, sending nothing: a finished run's folder, an interrupted or killed one (its usage as
of its last checkpoint, its lines as the files hold them now), or a set of shards, merged or
not yet (counted as the merge counts them)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from pipeline.account.usage import Usage
from pipeline.batch.tally import figures, shards_figures
from pipeline.errors import SettingsError
from pipeline.output.folder import LEDGER
from pipeline.output.ledger import Ledger
from pipeline.output.merge import merging
from pipeline.output.redo import failed_count
from pipeline.output.shards import added, find_shards, lines_in, running, shard_folders
from pipeline.output.writer import Redactor
from pipeline.report.markdown import usage_document, write_reports


def _folder(out: Path) -> tuple[Usage, dict[str, Any], dict[str, Any] | None]:
    """A run's folder: its usage as of its last checkpoint, its lines now, and what its
    batches came to (None: it made none)."""
    if running(out):
        raise SettingsError(f"a run is writing into {out} now: it writes its reports when it ends")
    ledger = Ledger(out / LEDGER)
    try:
        usage = Usage.from_state(ledger.get("usage"))
        batches = figures(ledger, refused=usage.answers.get("refused", 0))
        kept = failed_count(ledger.reading())  # (a failed redo's ids: results, listed in errors.jsonl)
    finally:
        ledger.close()
    last = usage.runs[-1] if usage.runs else {}
    state = {
        "succeeded": lines_in(out / "results.jsonl")[0],
        **({"kept_after_failed_redo": kept} if kept else {}),
        "failed": lines_in(out / "errors.jsonl")[0] - kept,
        "pending": last.get("pending"),
        "lines": last.get("lines"),
    }
    return usage, state, batches


def _shards(out: Path) -> tuple[Usage, dict[str, Any], dict[str, Any] | None]:
    """A set of shards: their usage added, their lines counted as the merge counts them, and
    what their batches came to, their books summed."""
    found = find_shards(out) if any(out.glob("shard-*-of-*")) else []
    shards = [s for s in found if s.job is not None]
    if not shards:
        raise SettingsError(
            f"{out} is not an output folder (no {LEDGER}, no shard-K-of-N folders): give the "
            "--output a run wrote to"
        )
    busy = [s.name for s in shards if running(s.path)]
    if busy:
        raise SettingsError(f"{', '.join(busy)} of {out} running now: each writes its reports when it ends")
    usage, pending, lines = added(shards)
    folders = [out] if (out / "results.jsonl").exists() else [s.path for s in shards]
    state = {
        "succeeded": sum(lines_in(f / "results.jsonl")[0] for f in folders),
        "failed": sum(lines_in(f / "errors.jsonl")[0] for f in folders),
        "pending": pending,
        "lines": lines,
    }
    batches = shards_figures([s.path for s in shards], refused=usage.answers.get("refused", 0))
    return usage, state, batches


def rebuild(out: Path) -> dict[str, Any]:
    """Write the folder's reports again; returns usage.json's document."""
    if not out.is_dir():
        raise SettingsError(
            f"{out} is not an output folder (no such folder): give the --output a run wrote to"
        )
    with contextlib.ExitStack() as held:
        if not (out / LEDGER).exists() and shard_folders(out):
            # A set of shards: its reports are a merge's too, written with the same temporary
            # files, so under the merge's lock (a merge under way is waited for).
            held.enter_context(merging(out))
        usage, state, batches = _folder(out) if (out / LEDGER).exists() else _shards(out)
        doc = usage_document(usage, state=state, folder=out, batches=batches)
        write_reports(out, doc, Redactor(None))
    return doc
