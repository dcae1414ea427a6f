"""Taking an ended batch in: its result lines, streamed, each to exactly one of

    a result     a 200 that is a chat completion keeping the verdict: results.jsonl
    again        what the synchronous path would try again (429, 5xx, an empty or invalid
                 answer, a line the batch never ran: expired, cancelled, unanswered, or held
                 back by the lines its validation named, `pipeline.batch.flawed`; these
                 judged in `pipeline.batch.unanswered`), staged
                 into a new batch from this batch's own file (tries + 1), while it has
                 tries left (`--max-attempts`, and the verdict's own for invalid answers);
                 with `--then sync`, sent now as requests instead
    a failure    the rest (400...), and what has no tries left: errors.jsonl
    refused      a line for an id this batch did not hold, or a second one for the same id:
                 counted (usage.json's answers, "refused"), never written

Exactly once: the outcomes are written by the run's writer, and the batch is committed
`taken` (with the new batches of its lines to go again) only once the writer has indexed
them all. A run killed before that takes the batch in again: ids already done are skipped
silently, failures are listed again under the same key (errors.jsonl holds each once), and
the lines to go again are found again.
"""

from __future__ import annotations

import contextlib
import itertools
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from typing import TYPE_CHECKING

from pipeline.account.books import Books
from pipeline.batch import flawed
from pipeline.batch.again import NOW, TAKING, send_now, stage_again
from pipeline.batch.ahead import read_ahead
from pipeline.batch.book import Batch, Book, Listed
from pipeline.batch.clear import STRANGERS
from pipeline.batch.judge import LineJudge
from pipeline.batch.now import SendNow
from pipeline.batch.paired import Paired
from pipeline.batch.stage import Files
from pipeline.batch.submit import info_state
from pipeline.batch.tally import TAKEN_AT, Spent
from pipeline.batch.unanswered import flawed_said, judge_unanswered, unanswered
from pipeline.job import Outcome, Success
from pipeline.output.ledger import Ledger
from pipeline.output.writer import Writer
from pipeline.prices import Price
from pipeline.send.batchapi import BatchApi, BatchInfo
from pipeline.send.verdict import Verdict

if TYPE_CHECKING:
    from pipeline.batch.keep import Keep
    from pipeline.batch.twins import Twins

WRITE_EVERY = 512  # outcomes written at once
READ_EVERY = 512  # result lines looked up at once
CROWDED = "token_limit_exceeded"  # a batch failed for the provider's want of room


class Intake:
    def __init__(
        self,
        *,
        api: BatchApi,
        book: Book,
        ledger: Ledger,
        writer: Writer,
        books: Books,
        verdict: Verdict | None,
        max_attempts: int,
        files: Callable[[], Files],
        commit: Callable[[], bool],
        say: Callable[[str], None],
        wall: Callable[[], float] = time.time,
        now: SendNow | None = None,
        sync_prices: Mapping[str, Price] | None = None,
        taken: Callable[[int], None] | None = None,
        keep: Keep | None = None,
        twins: Twins | None = None,
    ) -> None:
        self.twins = twins  # lines answered with their leader's (`pipeline.batch.twins`)
        self.keep = keep  # `--cache DIR`: the answers brought, kept there (`pipeline.batch.keep`)
        self.taken = taken  # told each batch committed taken: what it left is deleted (`clear`)
        self.sync_prices = sync_prices or {}  # what the same answers cost now: the saving told
        self.spent = Spent(books.prices, self.sync_prices)  # the batch being taken in's answers
        self._spent: dict[int, Spent] = {}  # kept across a go cut short: its answers were written
        self.now = now  # `--then sync`: what a batch left undone is sent now, not batched again
        self.wall = wall  # the clock a batch's submission was dated by
        self.api, self.book, self.ledger, self.writer, self.books = api, book, ledger, writer, books
        self.verdict = verdict
        self.max_attempts = max_attempts
        self.files = files
        self.commit = commit
        self.say = say
        self.crowded = False  # the batch last taken in failed for want of room, not for its lines
        self.judge = LineJudge(
            book=book,
            ledger=ledger,
            books=books,
            verdict=verdict,
            max_attempts=max_attempts,
            now=now is not None,
        )
        ledger.writing().execute(TAKING)
        self.paired = Paired(None, book, self.judge)

    async def take(self, batch: Batch, info: BatchInfo, *, halted: bool = False) -> list[int] | None:
        """Take the ended batch in; the numbers of the batches its lines go again in, or None
        when it could not be taken whole (the folder takes no more: the run stops). `halted`:
        cancelled while this run followed it, none of its lines goes again (they fail, unsent,
        and the next run sends them)."""
        # What an earlier go at it wrote (its download cut short) indexed first: those ids are
        # then done, and skipped, rather than written twice; what it had not written yet is
        # let go, and met again.
        self.judge.outcomes = []
        self.spent = self._spent.setdefault(batch.n, Spent(self.books.prices, self.sync_prices))
        self.judge.halted = halted
        strangers = self.judge.strangers
        if self.writer.behind:  # (else a sync and a commit for nothing, at every batch)
            await self.writer.checkpoint()
        if self.writer.broken is not None:
            return None
        db = self.ledger.writing()
        db.execute("DELETE FROM taking")
        now = self.wall()
        waited = max(now - (batch.at or now), 0.0)  # from its submission: an answer's latency
        invalid = info.status == "failed" and info.counts.completed == 0 and bool(info.errors)
        # Failed for want of room at the provider (OpenAI's enqueued tokens, spent by batches
        # still running), not for its lines: they go again, once a batch running has ended.
        self.crowded = invalid and all(CROWDED in error for error in info.errors)
        invalid = invalid and not self.crowded
        if self.crowded:
            self.say(
                f"pipeline: batch {batch.n} ({info.id}) was refused for now ({info.errors[0]}); its "
                f"{batch.lines:,} lines go again once a batch running has ended"
            )
        # (only a file has lines: the inline shape's requests are posted, and a number its
        # errors might give counts what it does not say; then no line is blamed alone)
        filed = invalid and self.api.shape == "files"
        named = flawed.named(self.book.path(batch.n), info.flaws) if filed else None
        if invalid and named is None:
            self.say(
                f"pipeline: batch {batch.n} ({info.id}) failed validation, and its {batch.lines:,} "
                f"lines with it: {'; '.join(info.errors[:3])}"
            )
        paired = Paired(self.twins, self.book, self.judge, keep=self.keep, prices=self.books.prices)
        if self.twins is not None:
            await paired.begin(batch.n)
        self.paired = paired
        self.judge.seen = paired.seen if paired.leading else None
        if not (invalid or self.crowded):
            if self.keep is not None:
                await self.keep.read(self.book.path(batch.n), paired.keys or None)
            async with read_ahead(self.api.results(info), per=READ_EVERY) as runs:
                async for read in runs:
                    self.judge.lines(batch, read, waited)
                    if len(self.judge.outcomes) >= WRITE_EVERY and not self._write():
                        return None
                    if self.keep is not None:
                        await self.keep.reuse.flush_if_due()
        left = unanswered(self.ledger, self.book, self.judge, batch.n)
        held = judge_unanswered(self.judge, batch, info, left, named=named, invalid=invalid)
        if named is not None:
            self.say(
                flawed_said(batch, info, len(named), held, halted=self.judge.halted, now=self.now is not None)
            )
        if not self._write():
            return None
        loose: dict[str, list[Listed]] = {}
        moves: list[tuple[str, str, bytes]] = []
        if self.twins is not None:
            answered = await paired.answer(batch, partial(self._write, batch=False), WRITE_EVERY)
            if answered is None:
                return None
            loose, moves = answered
        if not self._write(batch=False):
            return None
        if self.keep is not None:
            self.keep.done()  # (its answers all queued: the batch's keys let go)
        again = await stage_again(self.book, self.ledger, batch, self.files(), {} if self.now else loose)
        if self.now is not None and not await send_now(
            self.book, self.ledger, batch, self.now, self._write_now, loose
        ):
            return None
        await self.writer.checkpoint()
        if self.writer.broken is not None:
            return None
        # (nothing awaited from here to the commit: a checkpoint of the writer meanwhile
        # would commit the new batches staged while this one is not taken yet)
        with self._whole():
            for n, lines, size, worst in again:
                self.book.staged(n, lines=lines, size=size, reserved=worst)
            if self.twins is not None:
                self.twins.follow(batch.n, moves)  # (into the batches just staged)
                self.twins.let_go(batch.n)
            # (its figures for the run's end and reports, in the commit that takes it: once)
            figures = self._figures(info, now, sum(lines for _, lines, _, _ in again))
            # Answers for ids it was not given: it may be another's, found by its model and
            # size where the provider keeps no tag; not ours to delete (`clear`).
            figures[STRANGERS] = self.judge.strangers - strangers
            self.book.looked(batch.n, figures)
            self.book.taken(batch.n)
        if not self.commit():
            return None
        if self.taken is not None and not figures[STRANGERS]:
            self.taken(batch.n)
        self._spent.pop(batch.n, None)
        with contextlib.suppress(OSError):
            self.book.path(batch.n).unlink(missing_ok=True)
        return [n for n, *_ in again]

    async def drop(self, batch: Batch, code: str, message: str) -> bool:
        """The provider refused the batch itself: every line of it fails with `message` (not
        sent again as it is), and the batch is dropped once they are written."""
        self.judge.outcomes = []
        self.ledger.writing().execute("DELETE FROM taking")
        twins: Iterator[Listed] = iter(())
        if self.twins is not None:
            self.twins.closing(batch.n)
            twins = (twin for twin, _ in self.twins.of(batch.n))
        for listed in itertools.chain(self.book.lines_of(batch.n), twins):
            if not self.ledger.is_done(listed.custom_id):
                self.judge.fail(batch, listed, code, message)
            if len(self.judge.outcomes) >= WRITE_EVERY and not self._write():
                return False
        if not self._write():
            return False
        await self.writer.checkpoint()
        if self.writer.broken is not None:
            return False
        with self._whole():
            self.book.dropped(batch.n)
            if self.twins is not None:
                self.twins.let_go(batch.n)
        if not self.commit():
            return False
        with contextlib.suppress(OSError):
            self.book.path(batch.n).unlink(missing_ok=True)
        return True

    @property
    def refused(self) -> int:
        """Result lines refused by this run (an id not sent in that batch, or sent back twice)."""
        return self.judge.refused

    @contextlib.contextmanager
    def _whole(self) -> Iterator[None]:
        """The book's steps of one change, all or none: a step that fails (or a cancellation
        there) takes back those before it, which a later commit would have made a half of
        (new batches of a batch's lines staged, the batch not taken: paid twice)."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.ledger.rollback()
            raise

    # -- writing, and going again ---------------------------------------------------------------

    def _figures(self, info: BatchInfo, taken_at: float, again: int) -> dict[str, object]:
        row = self.ledger.reading().execute("SELECT count(*) FROM taking WHERE again = ?", (NOW,)).fetchone()
        return {
            **info_state(info),
            TAKEN_AT: taken_at,
            "again": again,
            "now": int(row[0]),
            **self.spent.state(),
        }

    def _write_now(self, outcomes: list[Outcome]) -> bool:
        self.judge.outcomes += outcomes
        return self._write(batch=False)

    def _write(self, *, batch: bool = True) -> bool:
        """Write the outcomes judged; `batch`: they are the batch's answers (not `--then
        sync`'s), counted in its figures once written."""
        outcomes, self.judge.outcomes = self.judge.outcomes, []
        if not outcomes:
            return self.writer.broken is None
        successes = [o for o in outcomes if isinstance(o, Success)]
        sent = len(successes) - sum(s.reused for s in successes)  # (a reused answer made no attempt)
        if sent:
            self.books.answered(sent)
        if self.writer.broken is not None:
            return False
        try:
            self.writer.write(outcomes, successes)
        except OSError as e:
            self.writer.fail(e)
            return False
        if batch:
            self.spent.add(successes)
            if self.keep is not None:
                self.keep.put(successes)
            self.paired.written(successes)
        return True
