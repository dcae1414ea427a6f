"""report.html while a run goes: written again every few seconds, so that a person can watch
a run of hours in a browser rather than in the terminal it runs in. The page reloads itself
(a meta refresh, no script) until the run's end writes it once more without one
(`pipeline.run.ending`).

Each page replaces the last whole (a temporary file, synced, renamed): a browser that reloads
as it is written reads the one before or the one after, never half of either. It is drawn from
the books the run keeps in memory, never from the ledger: the document is taken on the event
loop (one copy, so that the run counting on cannot change it under the drawing), then drawn
and written in a worker thread. It is written no more often than REFRESH, and after a page
that took t seconds of CPU not before t / SHARE have passed, so that however long the timeline
the page costs the run no more than SHARE of a core.

A page that cannot be written (a full disk: the run is told by its own files too) or drawn (a
bug) is said once; the run goes on, and its end writes the report as always.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import orjson

from pipeline.batch.tally import figures
from pipeline.output.folder import write_lines
from pipeline.report.html import html_report, stopped_page
from pipeline.report.markdown import usage_document
from pipeline.run.redoing import kept as redo_kept

if TYPE_CHECKING:
    from pipeline.run.runner import Run

REFRESH = 5.0  # seconds: the first page after so long, the next no sooner, and the page's reload
SHARE = 0.01  # of the run's wall time, at most, spent drawing and writing the page
PAGE = "report.html"


class LiveReport:
    def __init__(self, run: Run) -> None:
        self.run = run
        self._said = False  # that a page could not be written

    async def follow(self) -> None:
        """Write the page every so often until cancelled (the run's middle ends)."""
        wait = REFRESH
        while True:
            await anyio.sleep(wait)
            wait = max(REFRESH, await self.write(refresh=math.ceil(wait)) / SHARE)

    async def write(self, *, refresh: int) -> float:
        """One page, as the run stands now; `refresh`: the seconds after which it reloads.
        Returns the CPU seconds it took. (CPU, not wall: on a busy loop the thread waits for
        its turn: on the 1,000,000-line benchmark, on a loaded machine, a page of milliseconds took
        0.7 s to come out, which held the next back 70 s.)"""
        began = time.thread_time()
        try:
            data = orjson.dumps(self.document())
            took = time.thread_time() - began
            took += await anyio.to_thread.run_sync(self._draw, data, refresh)
        except Exception as e:  # a live view never stops a run that is paying for its answers
            self._say(e)
            return time.thread_time() - began
        return took

    def _draw(self, data: bytes, refresh: int) -> float:
        began = time.thread_time()
        page = html_report(orjson.loads(data), refresh=refresh)
        write_lines(self.run.settings.folder / PAGE, [self.run.redact(page.encode())], suffix="live")
        return time.thread_time() - began

    def document(self) -> dict[str, Any]:
        """usage.json's document as the run stands: the lines of the folder now, this run's
        record so far (ended runs have theirs), what its batches came to."""
        run = self.run
        counts, usage, writer = run.counts, run.usage, run.writer
        delta = usage.outcomes - run.before
        failed = delta.get("failed", 0) + delta.get("invalid_input", 0)
        accounted = counts.empty + counts.skipped + counts.elsewhere + writer.written
        # The ids a redo chose keep their earlier answer until the new one comes: results, as
        # the run's end counts them (`pipeline.run.ending.finish`), not gone meanwhile.
        left, failed_kept = redo_kept(run)
        pending = None if counts.total is None else max(counts.total - accounted - (left - failed_kept), 0)
        state = {
            "succeeded": writer.results_kept + left,
            **({"kept_after_failed_redo": failed_kept} if failed_kept else {}),
            # (this run's: those of earlier runs it has not met again are pending)
            "failed": max(failed - failed_kept, 0),
            "pending": pending,
            "lines": counts.total,
        }
        record: dict[str, Any] = {
            "started": dt.datetime.fromtimestamp(run.started, dt.UTC).isoformat(timespec="seconds"),
            "wall_seconds": round(time.time() - run.started, 3),
            "succeeded": delta.get("succeeded", 0),
            "failed": delta.get("failed", 0),
            "invalid_input": delta.get("invalid_input", 0),
            "skipped": counts.skipped,
            "attempts": usage.attempts - run.attempts_before,
            "exit": "running",
            "note": "running",
        }
        batches = None
        with contextlib.suppress(sqlite3.Error):
            batches = figures(run.ledger, refused=usage.answers.get("refused", 0))
        return usage_document(
            usage, state=state, folder=run.settings.folder, batches=batches, held=left, running=record
        )

    def _say(self, error: Exception) -> None:
        if self._said:
            return
        self._said = True
        if isinstance(error, OSError):
            why = error.strerror or str(error)
        else:
            why = f"{type(error).__name__}: {error} (a bug: please report it)"
        said = (
            f"pipeline: {self.run.settings.folder / PAGE} could not be written as the run goes ({why}); "
            "the run goes on, and writes it at its end"
        )
        self.run.progress.say(self.run.redact.text(said))


def abandon(folder: Path) -> None:
    """The run ends without writing its end (a bug, exit 70; an error of its own end's): its last
    live page, where one is there, stops reloading and says so, rather than say "Running" for
    ever. At best: the run is failing already."""
    path = folder / PAGE
    with contextlib.suppress(OSError, UnicodeDecodeError):
        text = path.read_text()
        stopped = stopped_page(text)
        if stopped is not None:
            write_lines(path, [stopped.encode()], suffix="live")
