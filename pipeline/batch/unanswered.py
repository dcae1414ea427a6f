"""The lines an ended batch gave no result line for, found and judged: where its validation
named a line (`pipeline.batch.flawed`), that line fails; a line held back by the others'
flaws goes again (its tries not spent while the flaws are few); every line of a batch that
failed validation whole fails; the rest (expired, cancelled, unanswered) go again while they
have tries left, else fail. `pipeline.batch.intake` takes the batch in around them.
"""

from __future__ import annotations

from pipeline.batch import flawed
from pipeline.batch.book import Batch, Book, Listed
from pipeline.batch.judge import LineJudge
from pipeline.output.ledger import Ledger
from pipeline.send.batchapi import BatchInfo, Flaw


def unanswered(ledger: Ledger, book: Book, judge: LineJudge, n: int) -> list[Listed]:
    """The batch's lines it gave no line for (and not done before a crash)."""
    rows = (
        ledger.reading()
        .execute("SELECT id FROM batch_lines WHERE n = ? AND id NOT IN (SELECT id FROM taking)", (n,))
        .fetchall()
    )
    lines = []
    for (custom_id,) in rows:
        if ledger.is_done(custom_id):
            continue
        listed = book.listed(n, custom_id)
        if listed is not None:
            judge.first(custom_id)
            lines.append(listed)
    return lines


def judge_unanswered(
    judge: LineJudge,
    batch: Batch,
    info: BatchInfo,
    lines: list[Listed],
    *,
    named: dict[str, list[Flaw]] | None,
    invalid: bool,
) -> int:
    """Judge each of the lines the batch left unanswered; how many were held back by the
    flaws of others (`named`: the lines its validation named, with their flaws)."""
    held = 0  # lines never run for others' flaws
    for listed in lines:
        if named is not None:
            flaws = named.get(listed.custom_id)
            if flaws is not None:
                judge.flawed(batch, listed, flaws)
            else:
                held += 1
                message = f"the batch failed validation at other lines: {'; '.join(info.errors[:3])}"
                if len(info.flaws) < flawed.MANY:
                    judge.held(batch, listed, message)
                else:
                    judge.again_or_fail(batch, listed, "batch_invalid", message)
        elif invalid:
            message = "; ".join(info.errors[:5])
            judge.fail(batch, listed, "batch_invalid", f"the batch failed validation: {message}")
        else:
            judge.again_or_fail(batch, listed, "unanswered", f"the batch ended {info.status} without it")
    return held


def flawed_said(batch: Batch, info: BatchInfo, named: int, held: int, *, halted: bool, now: bool) -> str:
    """What a batch that failed validation at `named` of its lines did: `held`, the others
    held back; `halted`, cancelled while followed; `now`, its lines sent now (`--then sync`)."""
    said = (
        f"pipeline: batch {batch.n} ({info.id}) failed validation at {named:,} of its {batch.lines:,} "
        f"lines ({'; '.join(info.errors[:3])}): they fail"
    )
    if held and halted:
        return f"{said}, and the other {held:,} with them (the batch was cancelled)"
    if held:
        how = "are sent now (--then sync)" if now else "go again in a new batch"
        spent = "" if len(info.flaws) >= flawed.MANY else ", their tries not spent"
        return f"{said}; the other {held:,} {how}{spent}"
    return said
