"""What a person sees of the batches while a run follows them: their states, the lines the
provider says it has answered, and how long they have waited, for the bar's postfix and the
log line of a run without a terminal (`pipeline.run.progress`).

    3 batches: 1 validating, 2 in progress 41,200/50,000; waiting 2h13m; 1 to submit

The wait is counted from each batch's submission as the book dates it, so a batch an earlier
run submitted (a run stopped and started again, the next night's cron) shows its true age.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.quote import quote
from pipeline.run.progress import duration

if TYPE_CHECKING:
    from pipeline.batch.follow import Follower

# The provider's states in the order a batch goes through them, as a person reads them.
WORDS = {
    "validating": "validating",
    "in_progress": "in progress",
    "finalizing": "finalizing",
    "cancelling": "cancelling",
    "completed": "completed",
    "expired": "expired",
    "failed": "failed",
    "cancelled": "cancelled",
}


def answered(follower: Follower) -> int:
    """Lines the provider says are answered (completed or failed) in the batches running, not
    yet written: a batch being taken in (or whose taking in was cut short, to be taken again)
    counts what is not written of it yet."""
    lines = 0
    for n, info in follower.seen.items():
        if n not in follower.due:
            continue
        counted = info.counts.completed + info.counts.failed - follower.written_of.get(n, 0)
        if follower.taking is not None and follower.taking[0] == n:
            counted -= follower.intake.writer.written - follower.taking[1]
        lines += max(counted, 0)
    return lines


def status(follower: Follower) -> str:
    running = len(follower.due)
    waiting = len(follower.queue)
    held = len(follower.over_budget)
    if not (running or waiting or held):
        return "staging batches" if follower.staging else "no batch running"
    groups: dict[str, list[int]] = {}  # state -> [batches, answered, total]
    for n in follower.due:
        info = follower.seen.get(n)
        if info is None:
            group = groups.setdefault("submitted", [0, 0, 0])
        else:
            group = groups.setdefault(info.status, [0, 0, 0])
            group[1] += info.counts.completed + info.counts.failed
            group[2] += info.counts.total
        group[0] += 1
    order = [*WORDS, "submitted"]
    said = []
    for state in sorted(groups, key=lambda s: (order.index(s) if s in order else len(order), s)):
        count, done, total = groups[state]
        word = WORDS.get(state, "submitted" if state == "submitted" else quote(state))
        lines = f" {done:,}/{total:,}" if total and state != "validating" else ""
        said.append(f"{count:,} {word}{lines}")
    parts = []
    if running:
        batches = f"{running:,} batch{'es' if running != 1 else ''}"
        if len(said) == 1:  # "2 batches in progress 41,200/50,000"
            parts.append(f"{batches} {said[0].split(' ', 1)[1]}")
        else:
            parts.append(f"{batches}: {', '.join(said)}")
        since = [follower.since[n] for n in follower.due if n in follower.since]
        if since:
            parts.append(f"waiting {duration(max(follower.clock.wall() - min(since), 0.0))}")
    if waiting:
        parts.append(f"{waiting:,} to submit")
    if held:
        parts.append(f"{held:,} held until a batch ends")
    return "; ".join(parts)


def amend(follower: Follower, note: str, folder: object) -> str:
    """The run's last line, with what the run leaves at the provider and what it refused."""
    running, waiting = (
        len(follower.due) + len(follower.submitting),
        len(follower.queue) + len(follower.over_budget),
    )
    if running or waiting:
        left = []
        if running:
            left.append(
                f"{running:,} batch{'es' if running != 1 else ''} left running at the provider "
                "(they go on, and are paid for as they finish)"
            )
        if waiting:
            left.append(f"{waiting:,} staged and not submitted yet")
        note = (
            f"{note}; {' and '.join(left)}: run the same command again to take them in, or "
            f"`pipeline cancel {folder}` to cancel them"
        )
    if follower.intake.refused:
        note = (
            f"{note}; {follower.intake.refused:,} result line(s) refused (an id not sent in that "
            "batch, or sent back twice): not written"
        )
    return note
