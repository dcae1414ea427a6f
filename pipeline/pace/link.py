"""A shared pace's calls to the account's store, and the account's send log it keeps there.

- **A call when there is something to ask or tell**: a lease, a refusal, a rate found, a
  pause, a reading waiting for the account's log (every 20 ms); else one a second, or every
  20 ms while it holds starts and the account ramps up or its server was full lately, so that a
  pause reaches every process at once (told only with a lease, it reached each a lease later,
  and the starts leased before it went on into the refusals). What was sent and admitted goes
  with the next call, and up to when what it admitted is whole.
- **A limit found once.** Without `--rpm`, each process's rate finder watches its own
  requests for the moments the server is full, and the limit is read at those moments from
  what the whole account got through (`pipeline.pace.reading`): every process tells the store
  what it sent, what was refused and what admitted, by the hundredth (`pipeline.pace.accountlog`).
  Every process paces at the rate read; only the one whose reading is in force probes above
  it, for all. A pause one process is asked for is the pool's: every process waits it out.

The key names the account by a hash of the base URL and the API key, never the key itself.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from pipeline.pace.accountlog import AccountLog, said
from pipeline.pace.pacer import Then
from pipeline.pace.reading import READ_WAIT, Moment, Readings
from pipeline.pace.store import AccountStore, Ask, StoreAway

if TYPE_CHECKING:
    from pipeline.pace.leased import LeasedBudget

SYNC_IDLE = 1.0  # seconds between calls when nothing is wanted of the store sooner...
SYNC_QUICK = 0.02  # ...or while the account ramps up, or its server was full lately
SYNC_GAP = 0.005  # seconds at least between two calls
TELL_WITHIN = 0.02  # seconds a refusal waits to be told at most (one of a run the store saw)
RETRY_EVERY = 0.2  # seconds between attempts to reach a store that went away


class StoreLink:
    budget: LeasedBudget  # whose leases it asks for (set once both are made)

    def __init__(self, store: Callable[[], AccountStore], shown: str, say: Callable[[str], None]) -> None:
        self.store = store  # opens a connection to the account's store
        self.shown = shown  # the store, as said to a person (never with a password)
        self.say = say
        self._pid = f"{socket.gethostname()}:{os.getpid()}"
        self._want = 0  # starts wanted from the store now
        self._want_tokens = 0.0
        self._found: float | None = None  # a found rate to publish
        self._pause_for = 0.0  # a pause to publish
        self.account_log = AccountLog()  # ours, by the hundredth; and the store's clock on ours
        self._readings = Readings()
        self._on_full: Then | None = None
        self._full_seen: float | None = None  # the account's last full moment we know of
        self._resume_seen = -1.0  # and when the server had room again after it (the store's clock)
        self._answered = 0  # requests let through, not yet told (sent since the rate was told)
        self._rate = (0.0, -math.inf)  # the account's rate as last told, and since when (ours)
        self._wake = asyncio.Event()

    # -- what the pace asks and tells ------------------------------------------------------------

    def ask(self, starts: int, tokens: float = 0.0) -> None:
        if starts and not self._want:
            self._want = starts
        if tokens and not self._want_tokens:
            self._want_tokens = tokens
        self._wake.set()

    def publish(self, rate: float) -> None:
        """A rate found or stated: the account's."""
        self._found = rate
        self._wake.set()

    def paused(self, seconds: float) -> None:
        self._pause_for = max(self._pause_for, seconds)
        self._wake.set()

    # -- the account's send log, and readings from it ------------------------------------------

    @property
    def reads_account(self) -> bool:
        """Whether the account's limit is read here (none was given)."""
        return not self.budget.given

    def sent(self, at: float) -> None:
        self.account_log.sent(at)

    def answered(self, sent_at: float) -> None:
        """A request sent at `sent_at` got through. The ramp doubles on those sent at its rate:
        counting those sent before (late on busy cores), it went twice as far past the limit."""
        if sent_at >= self._rate[1]:
            self._answered += 1
        self.account_log.admitted(sent_at, self.budget._now())

    def refused(self, sent_at: float, resume: float) -> None:
        at = self.account_log.refused(sent_at, resume, self.budget._now())
        if at is not None and at >= self._resume_seen:
            # Told at once: a run of refusals across the account shows in the store. One of a
            # run the store has seen (sent before the room it told) is no news: told within
            # TELL_WITHIN, for the readings.
            self._wake.set()

    def watch(self, then: Then) -> None:
        self._on_full = then

    def read_full(self, at: float, resume: float, then: Then) -> None:
        offset = self.account_log.offset
        if offset is None or self.budget.alone:
            return  # alone, the last shared pace holds: there is no account to read
        # Read up to the refused request, and over the time up to it: its answer may come back
        # long after (a busy server or machine), and what was sent meanwhile is not counted.
        moment = Moment(at + offset, min(resume, at) + offset)
        self._readings.add(moment, self.budget._now(), then, after=moment.end - offset)
        self._wake.set()

    # -- the calls ------------------------------------------------------------------------------

    async def check(self) -> None:
        """The store must be there when the run starts: a wrong URL is said before anything
        is sent, not found out as a run going alone."""
        store = self.store()
        try:
            await store.check()
        finally:
            await store.close()

    async def run(self) -> None:
        """Keep in step with the store for as long as the run goes (a task of the run)."""
        store = self.store()
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    await self._sync(store, loop)
                    log = self.account_log
                    await self._readings.read(store, loop, self.budget.alone, log.late, log.by_answer)
                except StoreAway as e:
                    said = self.budget.away()
                    if said is not None:
                        self.say(
                            f"pipeline: the shared limit's store {self.shown} cannot be reached "
                            f"({e.reason}); going on alone at a share of the last shared pace "
                            f"({said}), and rejoining when it is back"
                        )
                    await anyio.sleep(RETRY_EVERY)
                    continue
                # A reading waiting for the account's log learns how far the store holds it
                # from the calls made for leases meanwhile, or reads when it has waited enough:
                # calls of their own to ask, every 20 ms, were most calls at 3,000 a minute.
                now = loop.time()
                quick = (self.budget.booting or now < self.budget.watch_until) and self.budget.holds
                wait = TELL_WITHIN if self.account_log.refusals else SYNC_QUICK if quick else SYNC_IDLE
                with anyio.move_on_after(max(self._readings.wait(now, wait, self.account_log.late), 0.0)):
                    await self._wake.wait()
                await anyio.sleep(SYNC_GAP)  # what else comes now goes in the same call
        finally:
            await store.close()

    async def _sync(self, store: AccountStore, loop: asyncio.AbstractEventLoop) -> None:
        self._wake.clear()
        want, want_tokens = self._want, self._want_tokens
        found, pause_for = self._found, self._pause_for
        log = self.account_log.take()
        answered, self._answered = self._answered, 0
        budget = self.budget
        sent_at = loop.time()
        try:
            r = await store.call(
                Ask(
                    self._pid,
                    want=want,
                    want_tokens=want_tokens,
                    given=budget.given,
                    given_tokens=budget.given_tokens,
                    found=found,
                    pause_for=pause_for,
                    log=said(log),
                    holds=budget.holds,
                    answered=answered,
                    whole=self.account_log.whole(sent_at, READ_WAIT),
                )
            )
        except StoreAway:
            self._answered += answered
            self.account_log.untold(log)  # told when the store is back
            raise
        now = loop.time()
        # Only what was sent is taken off: more may have come while the call was out.
        self._want -= want
        self._want_tokens = max(self._want_tokens - want_tokens, 0.0)
        if self._found == found:
            self._found = None
        if self._pause_for == pause_for:
            self._pause_for = 0.0
        self._readings.reported = r.reported
        if r.rate != self._rate[0]:
            self._rate = (r.rate, now)
        offset = (sent_at + now) / 2 - r.now  # the store's clock on ours
        self.account_log.offset = -offset
        if self._full_seen is not None and r.full_at > self._full_seen and self._on_full is not None:
            moment = Moment(r.full_at, r.full_resume)  # seen full by the account: read it
            self._readings.add(moment, now, self._on_full, after=moment.end + offset)
        self._full_seen = max(r.full_at, self._full_seen or -1.0)
        self._resume_seen = max(self._resume_seen, r.full_resume)
        budget.granted(r, offset, want_tokens)
