"""What a folder's batches came to, said in sentences for people: the end of a run at the
batch tier, report.md and report.html (each escapes them as it must), all from usage.json's
`batches` (`pipeline.batch.tally.figures`)."""

from __future__ import annotations

from typing import Any

from pipeline.account.cost import money
from pipeline.run.progress import duration


def _plural(count: int, word: str, plural: str | None = None) -> str:
    return f"{count:,} {word if count == 1 else plural or word + 'es'}"


def batch_brief(b: dict[str, Any]) -> str:
    """The batches in a few words, for the one line of a quiet run's end (a cron log)."""
    said = [_plural(int(b["made"]), "batch")]
    if b["running"]:
        said.append(f"{b['running']:,} still at the provider")
    if b["saved"] is not None:
        said.append(f"{money(b['saved'])} saved")
    return ", ".join(said)


def batch_sentences(b: dict[str, Any]) -> list[str]:
    """The batches in a few sentences: how many, how big, how long they waited, what was
    refused or went again, and what the answers cost at the batch price against now."""
    made, lines = int(b["made"]), int(b["lines"])
    size = b["lines_per_batch"]
    said = []
    first = f"At the batch tier: {_plural(made, 'batch')} made, {lines:,} lines"
    if made > 1:
        first += f" ({size['mean']:,} a batch on average, {size['min']:,} to {size['max']:,})"
    ended = ", ".join(f"{count:,} {status}" for status, count in b["ended"].items())
    first += f"; {ended}" if ended else ""
    left = []
    if b["running"]:
        left.append(f"{_plural(b['running'], 'batch')} still at the provider")
    if b["staged"]:
        left.append(f"{_plural(b['staged'], 'batch')} staged, not submitted yet")
    if b.get("submitting"):  # (absent from a usage.json an earlier version wrote)
        left.append(
            f"{_plural(b['submitting'], 'batch')} being submitted when a run stopped, perhaps made at "
            "the provider (the next run looks for it there before submitting it)"
        )
    said.append(first + (f"; {', '.join(left)}" if left else "") + ".")
    waited = b["waited_seconds"]
    if waited["max"] is not None:
        if waited["min"] == waited["max"]:
            said.append(f"Each waited {duration(waited['max'])} from its submission to its answers.")
        else:
            said.append(
                f"They waited {duration(waited['min'])} to {duration(waited['max'])} from submission to "
                f"answers (median {duration(waited['median'])})."
            )
    again = []
    if b["lines_again"]:
        again.append(f"{b['lines_again']:,} line(s) went again in a new batch")
    if b["lines_sent_now"]:
        again.append(f"{b['lines_sent_now']:,} were sent synchronously (--then sync)")
    if b["result_lines_refused"]:
        again.append(
            f"{b['result_lines_refused']:,} result line(s) were refused (an id not sent in that batch, "
            "or sent back twice) and not written"
        )
    if b["refused_by_provider"]:
        again.append(
            f"the provider refused {_plural(b['refused_by_provider'], 'batch')} (their lines failed)"
        )
    if again:
        text = "; ".join(again)
        said.append(text[0].upper() + text[1:] + ".")
    answers, cost, sync = int(b["answers"]), b["cost"], b["sync_cost"]
    if answers:
        # (`answers_costed`, `answers_at_sync_price`: absent from a usage.json an earlier
        # version wrote, where every answer was costed, at the batch price)
        uncosted = answers - int(b.get("answers_costed", answers)) if cost is not None else 0
        bounded = int(b.get("answers_at_sync_price", 0)) if cost is not None else 0
        if cost is None:
            spent = (
                f"The {answers:,} answers from batches: their cost at the batch price is not reported "
                "(neither the server nor [prices] tells it), not zero"
            )
        else:
            most = "at most " if bounded and not uncosted else ""
            spent = f"The {answers:,} answers from batches cost {most}{money(cost)} at the batch price"
            if uncosted:
                spent += f" and more: {uncosted:,} of them came without a cost and with no price in [prices]"
        if bounded:
            spent += (
                f" ({bounded:,} of them at the synchronous price: [prices] gives their model no batch "
                "price, so no saving is told; add batch = 0.5 to [prices])"
            )
        elif sync is not None and cost is not None and not uncosted:
            saved = b["saved"]
            share = f" ({saved / sync:.0%})" if sync > 0 else ""
            spent += (
                f"; at the synchronous price they would have cost {money(sync)}: {money(saved)} saved{share}"
            )
        else:
            spent += " (what they would have cost synchronously is not told: [prices] lacks a model's price)"
        said.append(spent + ".")
    return said
