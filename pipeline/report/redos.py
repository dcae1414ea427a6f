"""What the folder's `--redo` runs did, for usage.json and both reports: how many lines each
sent again and why, what the answers they replaced had cost, and how the job changed."""

from __future__ import annotations

from collections import Counter
from typing import Any

from pipeline.account.cost import money


def redo_figures(redos: list[dict[str, Any]]) -> dict[str, Any] | None:
    """usage.json's `redo`: the totals over every redo, and each one (None: there was none)."""
    if not redos:
        return None
    reasons: Counter[str] = Counter()
    for redo in redos:
        reasons.update(redo.get("reasons") or {})
    return {
        "lines": sum(int(r.get("lines", 0)) for r in redos),
        "reasons": dict(reasons),
        "superseded_cost": round(sum(float(r.get("superseded_cost", 0.0)) for r in redos), 6),
        "superseded_not_priced": sum(int(r.get("unpriced", 0)) for r in redos),
        "runs": redos,
    }


def redo_sentences(figures: dict[str, Any]) -> list[str]:
    """The report's words for `redo_figures`."""
    why = ", ".join(f"{reason} {n:,}" for reason, n in figures["reasons"].items()) or "none chosen"
    unpriced = figures["superseded_not_priced"]
    said = [
        f"{figures['lines']:,} line(s) were chosen by --redo to go again ({why}). The answers they "
        f"replace cost {money(figures['superseded_cost'])}"
        + (f" ({unpriced:,} of unknown cost)" if unpriced else "")
        + ": paid for, each is counted in the figures above beside its new one, and moves to "
        "superseded.jsonl once that is in results.jsonl (a redo that failed keeps it there); "
        "results.jsonl holds one answer per line."
    ]
    for run in figures["runs"]:
        changes = "; ".join(run.get("changes") or []) or "no change to the job"
        shard = f" ({run['shard']})" if run.get("shard") else ""
        said.append(
            f"{run.get('started', '')}{shard}: --redo {run.get('what', '')}, {run.get('lines', 0):,} line(s); {changes}."
        )
    return said
