"""`pipeline report OUT`: usage.json, report.md and report.html again, from what a folder
holds, sending nothing: a finished run's folder, an interrupted or killed one (its usage as
of its last checkpoint, its lines as the files hold them now), or a merged set of shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.account.usage import Usage
from pipeline.errors import SettingsError
from pipeline.output.folder import LEDGER
from pipeline.output.ledger import Ledger
from pipeline.output.merge import find_shards
from pipeline.output.writer import Redactor
from pipeline.report.markdown import usage_document, write_reports


def _lines(path: Path) -> int:
    if not path.exists():
        return 0
    count = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
    return count


def _usage(out: Path) -> Usage:
    if (out / LEDGER).exists():
        ledger = Ledger(out / LEDGER)
        try:
            return Usage.from_state(ledger.get("usage"))
        finally:
            ledger.close()
    shards = [s for s in find_shards(out) if s.job is not None] if any(out.glob("shard-*-of-*")) else []
    if not shards:
        raise SettingsError(
            f"{out} is not an output folder (no {LEDGER}, no shard-K-of-N folders): give the "
            "--output a run wrote to"
        )
    usage = Usage()
    for shard in shards:
        usage.add(shard.usage, label=f"{shard.k}/{shard.n}")
    usage.runs.sort(key=lambda r: str(r.get("started", "")))
    return usage


def rebuild(out: Path) -> dict[str, Any]:
    """Write the folder's reports again; returns usage.json's document."""
    if not out.is_dir():
        raise SettingsError(
            f"{out} is not an output folder (no such folder): give the --output a run wrote to"
        )
    usage = _usage(out)
    last = usage.runs[-1] if usage.runs else {}
    state = {
        "succeeded": _lines(out / "results.jsonl"),
        "failed": _lines(out / "errors.jsonl"),
        "pending": last.get("pending"),
        "lines": last.get("lines"),
    }
    doc = usage_document(usage, state=state, folder=out)
    write_reports(out, doc, Redactor(None))
    return doc
