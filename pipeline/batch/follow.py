"""Following the folder's batches: each staged one submitted, each running one looked at every
`batch_poll` seconds (at most one look a second in all, whatever the number of batches), and
each that ended taken in, its lines to go again submitted in turn. Waits are awaited on a
clock a test can fake; a batch staged, or the run stopping, wakes the wait at once.
A batch just submitted is looked at sooner (`clock.next_look`).
"""

from __future__ import annotations

from collections.abc import Callable

import anyio

from pipeline.account.cost import Budget
from pipeline.batch import stops, view
from pipeline.batch.book import RUNNING, Batch, Book
from pipeline.batch.clock import Clock, next_look
from pipeline.batch.hold import Holds
from pipeline.batch.intake import Intake
from pipeline.batch.submit import RETRY_MOST, Refused, gone, next_try, submit
from pipeline.batch.sweep import Sweep
from pipeline.errors import RequestError, RunStopped
from pipeline.run.control import Control
from pipeline.run.progress import duration
from pipeline.send.batchapi import BatchApi, BatchInfo, NoBatchApi

LOOK_GAP = 1.0  # seconds between two looks, at least, whatever the number of batches


class Follower:
    def __init__(
        self,
        *,
        api: BatchApi,
        book: Book,
        intake: Intake,
        control: Control,
        clock: Clock,
        poll: float,
        give_up: float,
        commit: Callable[[], bool],
        say: Callable[[str], None],
        budget: Budget | None = None,
    ) -> None:
        # --max-cost: each batch's worst case, held before it is submitted
        self.holds = Holds(budget, control.stop)
        # staged, waiting for a batch running to end: over the budget, or the provider's room
        self.over_budget: list[int] = []
        self.api, self.book, self.intake, self.control, self.clock = api, book, intake, control, clock
        self.poll = max(poll, 0.0)
        self.give_up = give_up
        self.commit = commit
        self.say = say
        self.queue: list[int] = []  # staged or creating: to submit, in order
        self.submitting: set[int] = set()  # being made: the call under way (or cut off by a stop)
        self.retry_at: dict[int, tuple[float, float]] = {}  # n -> (when to try again, failing since)
        self.due: dict[int, float] = {}  # running: n -> when to look next
        self.seen: dict[int, BatchInfo] = {}  # running: as last described
        # running: when it was submitted (the book's `at`, by the wall clock): a batch an
        # earlier run submitted has waited since then, not since this run began
        self.since: dict[int, float] = {}
        self.taking: tuple[int, int] | None = None  # (n, lines written before) while taken in
        self.written_of: dict[int, int] = {}  # n -> its lines written by a go cut short
        self.first_status: dict[int, str] = {}  # running: its status at this run's first sight of it
        self.unread: dict[int, float] = {}  # ended, its results failing to be read: since when
        self.staging = True  # more may be staged
        self._last_look = -LOOK_GAP
        self._wake = anyio.Event()
        self.sweep = Sweep(api)  # many running batches looked at in one call

    # -- told by the others ------------------------------------------------------------------

    def staged(self, n: int) -> None:
        self.queue.append(n)
        self.wake()

    def staging_done(self) -> None:
        self.staging = False
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    def running(self, n: int, info: BatchInfo | None = None, *, at: float | None = None) -> None:
        """Batch n is made (`info`: as just described; None: to be looked at now), submitted
        at `at` (epoch seconds; None: now)."""
        self.since.setdefault(n, self.clock.wall() if at is None else at)
        self.due[n] = self.clock.now() if info is None else self.clock.now() + self._gap(n)
        if info is not None:
            self.seen[n] = info
            self.first_status.setdefault(n, info.status)

    def _gap(self, n: int) -> float:
        return next_look(self.clock.wall() - self.since.get(n, self.clock.wall()), self.poll)

    # -- the loop ------------------------------------------------------------------------------

    async def run(self) -> None:
        control = self.control
        while control.dispatching:
            now = self.clock.now()
            ready = [n for n in self.queue if self.retry_at.get(n, (0.0, 0.0))[0] <= now]
            for n in ready:
                self.queue.remove(n)
                await self._submit(n)
                if not control.dispatching:
                    return
            if ready:
                continue
            times = [self.retry_at[n][0] for n in self.queue if n in self.retry_at]
            look = min(self.due, key=self.due.__getitem__) if self.due else None
            if look is not None:
                times.append(max(self.due[look], self._last_look + LOOK_GAP))
            if not times:
                if not self.staging:
                    return  # every batch taken in, and no more to come
                await self._sleep(None)
                continue
            when = min(times)
            if when > self.clock.now():
                await self._sleep(when - self.clock.now())
                continue
            if look is not None and max(self.due[look], self._last_look + LOOK_GAP) <= self.clock.now():
                await self._look_due(look)

    async def _sleep(self, seconds: float | None) -> None:
        wake = self._wake
        if not wake.is_set():
            await self.clock.wait(seconds, wake)
        if wake.is_set():
            self._wake = anyio.Event()

    def hold(self, batch: Batch, *, made: bool = False) -> bool:
        return self.holds.hold(batch, made=made)

    def _release(self, n: int) -> None:
        self.holds.release(n)
        self.queue[:0], self.over_budget = self.over_budget, []  # they may fit now

    async def _submit(self, n: int) -> None:
        # Until the call returns, the batch may be made: a run cancelled meanwhile (a second
        # Ctrl-C, the grace over) counts it among those left at the provider.
        self.submitting.add(n)
        await self._submit_one(n)
        self.submitting.discard(n)

    async def _submit_one(self, n: int) -> None:
        batch = self.book.batch(n)
        if not self.hold(batch):
            self.over_budget.append(n)  # staged still: tried again once a batch running ends
            return
        try:
            info = await submit(self.api, self.book, batch, now=self.clock.wall, commit=self.commit)
        except Refused as e:
            self.say(f"pipeline: batch {n}: {e.message}; its {batch.lines:,} lines fail")
            await self.intake.drop(
                batch, e.error.code if e.error.status is None else str(e.error.status), e.message
            )
            return
        except RunStopped as e:
            self.queue.insert(0, n)  # (said as left: the next run submits it, or finds it made)
            self.control.stop(e)
            return
        except RequestError as e:
            self._failed_submit(n, e)
            return
        self.retry_at.pop(n, None)
        if info is None:
            self.queue.insert(0, n)  # made, its id not noted: the next run finds it
            return
        self.running(n, info, at=self.book.batch(n).at)

    def _failed_submit(self, n: int, error: RequestError) -> None:
        now = self.clock.now()
        _, since = self.retry_at.get(n, (now, now))
        wait = next_try(error, failing=now - since, give_up=self.give_up)
        if isinstance(wait, RunStopped):
            self.control.stop(wait)
            return
        self.say(f"pipeline: batch {n} not submitted yet ({error.message}); trying again in {duration(wait)}")
        self.retry_at[n] = (now + wait, since)
        self.queue.append(n)

    async def _look_due(self, n: int) -> None:
        """Batch n is due: looked at alone, or with every running batch a page of the list shows
        (`sweep`)."""
        if not self.sweep.wants(n, len(self.due)):
            self.sweep.alone.discard(n)
            await self._look(n)
            return
        batches = {b.batch_id: b for b in self.book.batches(RUNNING) if b.n in self.due and b.batch_id}
        due = {b.n for b in batches.values() if self.due[b.n] <= self.clock.now()}
        self._last_look = self.clock.now()
        try:
            found = await self.sweep.look(
                {i: b.n for i, b in batches.items()},
                due,
                {b.n: b.at for b in batches.values()},
                now=self._last_look,
            )
        except NoBatchApi:
            self.control.stop(gone())
            return
        except RequestError as e:
            self._unseen("the list of batches", e)
            self.due[n] = self.clock.now() + self.poll
            return
        for m, info in (found or {}).items():
            if m in self.due and self.control.dispatching:
                self.due[m] = self.sweep.began + self._gap(m)
                await self._seen(self.book.batch(m), info)

    async def _look(self, n: int) -> None:
        batch = self.book.batch(n)
        self._last_look = self.clock.now()
        self.due[n] = self.clock.now() + self._gap(n)
        assert batch.batch_id is not None
        try:
            info = await self.api.get(batch.batch_id)
        except NoBatchApi:
            self.control.stop(gone())
            return
        except RequestError as e:
            self._unseen(f"batch {batch.batch_id}", e)
            return  # looked at again at the next poll
        await self._seen(batch, info)

    def _unseen(self, what: str, e: RequestError) -> None:
        stop = stops.not_shown(what, e)
        if stop is not None:
            self.control.stop(stop)

    async def _seen(self, batch: Batch, info: BatchInfo) -> None:
        """A look at batch n found it so: an ended one is taken in."""
        n = batch.n
        self.seen[n] = info
        first = self.first_status.setdefault(n, info.status)
        if not info.ended:
            return
        # (its lines count as the provider's until they are written, then as written: the
        # progress neither counts them twice nor drops them meanwhile)
        self.taking = (n, self.intake.writer.written)
        # Cancelled while this run followed it (pipeline cancel OUT, or at the provider): a
        # person wants it stopped. What it did is taken in, nothing of it goes again, and the
        # run stops (else it would submit again at once what the cancel stopped). One found
        # cancelling or cancelled at the run's first look was cancelled before: it goes again.
        halted = info.status == "cancelled" and first not in ("cancelling", "cancelled")
        try:
            again = await self.intake.take(batch, info, halted=halted)
        except NoBatchApi:
            self.control.stop(gone())
            return
        except RequestError as e:  # its results could not be read: read again at the next look
            since = self.unread.setdefault(n, self.clock.now())
            if self.clock.now() - since >= self.give_up:  # (as long as a refused submission)
                self.control.stop(stops.unread(n, self.clock.now() - since, e))
                return
            self.say(f"pipeline: the results of batch {n} could not be read ({e.message}); trying again")
            return
        finally:
            written = self.intake.writer.written - self.taking[1]
            self.taking = None
            if written:
                self.written_of[n] = self.written_of.get(n, 0) + written
        self.unread.pop(n, None)
        if again is None:
            return  # the folder took no more: the run stops
        del self.due[n]
        self._release(n)
        self.seen.pop(n, None)
        self.since.pop(n, None)
        self.written_of.pop(n, None)
        self.first_status.pop(n, None)
        if halted:
            self.control.stop(stops.cancelled_while_followed(n))
            return
        if not self.intake.crowded:
            self.queue += again
        elif self.due:
            self.over_budget += again  # submitted once a batch running ends and makes room
        else:
            for m in again:  # none running: the room is the provider's to make, in its time
                self.retry_at[m] = (self.clock.now() + max(self.poll, RETRY_MOST), self.clock.now())
            self.queue += again

    # -- what a person sees (`pipeline.batch.view`) ------------------------------------------

    def status(self) -> str:
        return view.status(self)

    def answered(self) -> int:
        return view.answered(self)

    @property
    def left(self) -> int:
        """Batches not taken in: running, or staged and not submitted."""
        return len(self.due) + len(self.submitting) + len(self.queue) + len(self.over_budget)

    def amend(self, note: str, folder: object) -> str:
        """The run's last line, with what it leaves at the provider and what it refused."""
        return view.amend(self, note, folder)
