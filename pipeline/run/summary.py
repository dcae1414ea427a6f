"""How a run ended: its exit status, the line that says it, and the summary it returns.

Exit status (DESIGN.md): 0 every request succeeded (or there was nothing to do); 1 some
ended failed; 2 the command or job file is wrong and nothing was sent; 3 the run stopped
early for a person to act, and can be resumed; 130 interrupted, and can be resumed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.input.reader import ReadCounts
from pipeline.input.stdin import named
from pipeline.run.control import Control

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_STOPPED, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BUG = 70  # EX_SOFTWARE: neither the user's nor the server's doing


@dataclass(frozen=True)
class Summary:
    """What a run did, and what the output folder holds now (the same as usage.json)."""

    exit_code: int
    message: str
    output: Path
    succeeded: int  # in this run
    failed: int  # requests that ended failed in this run
    invalid_input: int  # bad input lines met in this run
    skipped: int  # already done by an earlier run
    pending: int | None  # lines left to do (interrupted or stopped); None: not known (a pipe)
    usage: dict[str, Any]
    own_model: int = 0  # lines that named a model of their own, which a job's model does not change
    reused: int = 0  # of those succeeded, taken from the answer cache: not sent, not paid

    @property
    def cost(self) -> float | None:
        total = self.usage["cost"]["total"]
        return None if total is None else float(total)


def exit_status(
    control: Control, *, pending: int | None, failed_now: int, errors_file: Path
) -> tuple[int, str]:
    """How a run ended, as an exit status and a line. Interrupted with nothing left to do is
    done, not interrupted."""
    if control.interrupted and pending != 0:
        return EXIT_INTERRUPTED, "interrupted: run the same command again to resume"
    if control.stopped is not None:
        return EXIT_STOPPED, control.stopped.args[0]
    if failed_now:
        return EXIT_FAILURES, f"{failed_now:,} line(s) failed: see {errors_file}"
    return EXIT_OK, "every request succeeded"


def pending_lines(counts: ReadCounts, control: Control, written: int) -> int | None:
    """Lines left to do: none once the input was read to its end while dispatching; else the
    lines not accounted for; None for a pipe not read to its end (how much is left is not
    known). `written`: the outcomes this run wrote."""
    if counts.finished and control.dispatching:
        return 0
    accounted = counts.empty + counts.skipped + counts.elsewhere + written
    if counts.total is not None:
        return max(counts.total - accounted, 0)
    return None if not counts.finished else 0


def nothing_to_do(counts: ReadCounts, *, source: Path, shard: object) -> str | None:
    """The line of a run that found nothing to send, and why; None when it had work."""
    if not counts.finished:
        return None
    requests = counts.read - counts.empty - counts.elsewhere
    if counts.read == counts.empty:
        return f"nothing to do: {named(source)} has no lines (it is empty); nothing was sent"
    if requests == 0:
        return f"nothing to do in shard {shard}: the {counts.elsewhere:,} lines are other shards'"
    if requests == counts.skipped:
        return f"nothing left to do: all {requests:,} lines were done by earlier runs into this folder"
    return None
