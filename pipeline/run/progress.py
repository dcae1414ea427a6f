"""What a person sees while a run goes: a bar on a terminal, else a log line now and then.

Progress is read from the counters a few times a second (a bar) or once a `progress_interval`
(a log line for cron and CI), never updated per request: the hot path pays nothing for it.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Never, Protocol, TextIO

import anyio

from pipeline.account.cost import money
from pipeline.input.stdin import named
from pipeline.quote import quote

if TYPE_CHECKING:
    from tqdm import tqdm

    from pipeline.account.timeline import Paces
    from pipeline.account.usage import Usage
    from pipeline.input.reader import ReadCounts
    from pipeline.job import Failure
    from pipeline.output.writer import Writer
    from pipeline.settings import Settings

BAR_REFRESH = 0.25  # seconds
MODELS = 3  # models with a pace of their own named in the progress line
FALLBACK_COLUMNS, FALLBACK_ROWS = 120, 24  # a terminal's size where it says none
MAX_NOTICES = 20  # bad input lines named on the terminal; errors.jsonl lists them all


class Batches(Protocol):
    """The batches a run at `--tier batch` follows, as the progress reads them."""

    def status(self) -> str:
        """Their states, the lines answered of their counts, how long they have waited."""

    def answered(self) -> int:
        """Lines the provider says it has answered in them, not yet written."""


def _columns(stream: TextIO) -> int | None:
    """The terminal's width as it says it (0: not set); None where the stream tells none."""
    try:
        return os.get_terminal_size(stream.fileno()).columns
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class Progress:
    def __init__(
        self,
        settings: Settings,
        counts: ReadCounts,
        writer: Writer,
        usage: Usage,
        *,
        stream: TextIO | None = None,
    ) -> None:
        self.counts = counts
        self.writer = writer
        self.usage = usage
        self.stream = stream or sys.stderr
        self.interval = settings.progress_interval
        self.quiet = settings.quiet
        self.input = named(settings.input)
        self.input_errors = 0
        self.bar: tqdm[Never] | None = None
        if not settings.quiet and self.stream.isatty():
            from tqdm import tqdm  # only for a terminal: a nightly run does not import it

            unit = "line" if settings.tier == "batch" else "req"
            # A terminal whose size nobody set (a pty: `script`, a CI runner's, `docker exec -t`)
            # says it is 0 by 0, and tqdm then draws nothing at all: no row is free for a bar.
            unsized = _columns(self.stream) == 0
            self.bar = tqdm(
                total=None,
                unit=unit,
                file=self.stream,
                dynamic_ncols=not unsized,
                ncols=FALLBACK_COLUMNS if unsized else None,
                nrows=FALLBACK_ROWS if unsized else None,
                smoothing=0.05,
            )
        self.started = time.monotonic()
        # In flight, and the pace in force with where it comes from (given, stated, found).
        self.sample: Callable[[], tuple[int, float | None, str | None, float | None]] | None = None
        self.paces_of: Paces | None = None  # the same, for each model with a pace of its own
        self.batches: Batches | None = None  # at --tier batch: shown in the pace's place
        self.heard: list[Callable[[str], None]] = []  # who else hears what is said (a Ray driver)
        before = usage.totals()
        self._cost_before, self._answers_before = before.cost, before.requests
        self._failed_before = usage.outcomes.get("failed", 0) + usage.outcomes.get("invalid_input", 0)
        self._reused_before = usage.reused

    def _reused(self) -> str:
        """This run's results taken from the answer cache, where there are any."""
        reused = self.usage.reused - self._reused_before
        return f", {reused:,} reused" if reused else ""

    def input_error(self, failure: Failure) -> None:
        """Say where a bad line is, as `file:line: what is wrong`, for the first few."""
        self.input_errors += 1
        if self.quiet or self.input_errors > MAX_NOTICES + 1:
            return
        if self.input_errors == MAX_NOTICES + 1:
            text = f"{self.input}: more invalid lines; all are listed in errors.jsonl"
        else:
            text = f"{self.input}:{failure.line}: {failure.message}"
        self.say(text)

    def say(self, text: str) -> None:
        """A line for the person at the terminal (or the log), now, under the bar."""
        for hear in self.heard:
            hear(text)
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def done(self) -> int:
        c = self.counts
        return c.empty + c.skipped + c.elsewhere + self._now()

    def _now(self) -> int:
        """This run's lines done: written, and (batches) those the provider says it answered.
        A batch's lines are its work as soon as they are answered there; the bar of a batch
        run would otherwise stand still for hours, then jump."""
        written = self.writer.written
        return written if self.batches is None else written + self.batches.answered()

    def _figures(self) -> tuple[int, int, float | None]:
        total = self.usage.totals()
        failed = self.usage.outcomes.get("failed", 0) + self.usage.outcomes.get("invalid_input", 0)
        cost = total.cost - self._cost_before if (total.with_cost or total.priced) else None
        if cost is None and total.requests == self._answers_before:
            cost = 0.0  # nothing answered yet (a batch run waits hours so): nothing spent, not unknown
        return total.total_tokens, failed - self._failed_before, cost

    def figures(self) -> dict[str, Any]:
        """Where the run stands, for a driver that shows many runs as one (`pipeline ray`)."""
        c = self.counts
        tokens, failed, cost = self._figures()
        rate, kind = None, None
        if self.sample is not None:
            _, rate, kind, _ = self.sample()
        return {
            "total": c.total,
            "empty": c.empty,
            "done": c.skipped + self.writer.written,  # this shard's lines, done before or now
            "written": self.writer.written,
            "tokens": tokens,
            "failed": failed,
            "cost": cost,
            "refused": self.usage.timeline.recent("429", 60.0),
            "pace": rate,
            "kind": kind,
            "paces": self.paces(),
        }

    def paces(self) -> str:
        """The paces in force: the account's, and each model's with a pace of its own."""
        pace = "unpaced"
        if self.sample is not None:
            _, rate, kind, _ = self.sample()
            if rate:
                pace = f"pace {rate * 60:,.0f}/min ({kind})"
        scoped = self.paces_of() if self.paces_of is not None else {}
        paced = sorted((rate, model, kind) for model, (rate, kind, _) in scoped.items() if rate)
        if paced:
            # The slowest few by name: forty `:free` models found limited would make a line of
            # thousands of characters, in the bar and in a log line each minute.
            models = [
                f"pace {rate * 60:,.0f}/min ({kind}) for {quote(model)}"
                for rate, model, kind in paced[:MODELS]
            ]
            if len(paced) > MODELS:
                models.append(f"{len(paced) - MODELS:,} more models paced on their own")
            pace = "; ".join([*models, f"account {pace.removeprefix('pace ')}"])
        return pace

    def _pace(self) -> str:
        """The paces in force and the 429s of the last minute: a person watching sees the
        limit being found."""
        if self.batches is not None:
            return self.batches.status()
        refused = self.usage.timeline.recent("429", 60.0)
        return f"{self.paces()}, {refused:,} 429s in the last minute"

    def line(self) -> str:
        done, total = self.done(), self.counts.total
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.writer.written / elapsed
        tokens, failed, cost = self._figures()
        of = f"{done:,} of {total:,} done ({done / total:.0%})" if total else f"{done:,} done"
        eta = ""
        if total and rate > 0 and done < total:
            eta = f" | about {duration((total - done) / rate)} left"
        pace = f"{rate:,.1f} req/s | "
        if self.batches is not None:
            # The provider answers in its own time (a batch validates for an hour, then answers
            # thousands a minute): a rate and a time left drawn from it would mislead.
            pace = eta = ""
        return (
            f"pipeline: {of}{self._reused()} | {pace}{self._pace()} | {failed:,} failed | {tokens:,} tokens | "
            f"{money(cost, unknown='cost not reported')}{eta}"
        )

    async def tick(self) -> None:
        if self.bar is not None:
            while True:
                await anyio.sleep(BAR_REFRESH)
                self._refresh_bar()
        else:
            while True:
                await anyio.sleep(self.interval)
                print(self.line(), file=self.stream, flush=True)

    def _refresh_bar(self) -> None:
        """The bar counts this run's work only: lines done by earlier runs (and empty ones)
        are neither its progress nor its speed, so they leave its total instead."""
        bar, counts = self.bar, self.counts
        assert bar is not None
        written = self._now()
        if counts.total is not None:
            to_do = max(counts.total - counts.skipped - counts.empty - counts.elsewhere, written)
            if bar.total != to_do:
                bar.total = to_do
        tokens, failed, cost = self._figures()
        before = f", {counts.skipped:,} done before" if counts.skipped else ""
        bar.set_postfix_str(
            f"{self._pace()}, {tokens:,} tokens, {failed:,} failed{self._reused()}, "
            f"{money(cost, unknown='cost not reported')}{before}",
            refresh=False,
        )
        if written != bar.n:
            bar.update(written - bar.n)
        else:  # (update draws only on a change: the postfix, the batches' states, moves alone)
            bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self._refresh_bar()
            self.bar.close()
            self.bar = None
