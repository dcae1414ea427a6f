"""One pace for every process of an account, through Redis (`--shared-limit redis://...`).

The pacer of `local` with its start times leased from a store that every process shares:

- **Leases, not a round trip a request.** The store keeps one virtual clock per account in
  the manner of GCRA: a process asks for a lease of `n` starts and is given the stretch of
  the shared timeline from `max(clock, now)` on, `n / rate` long; the clock moves past it.
  The process spends its starts evenly over that stretch. Stretches never overlap, so the
  processes together start exactly `rate` requests a second, however many they are; a lease
  is a tenth of a second of the account's rate (a fiftieth while it ramps up or was full
  lately, so that a pause reaches every process soon), and four starts at least, so a call
  to the store serves several requests at any rate. Tokens, given or stated, likewise
  (`pipeline.pace.lease`).
- **A call when there is something to ask or tell**: a lease, a refusal, a rate found, a
  pause, a reading waiting for the account's log; else one a second, or every 20 ms while the
  account ramps up or its server was full lately, so that a pause reaches every process at
  once. What was sent goes with whichever call comes next. The store's script does a few
  commands a call, and looks back over the send log only when told of a refusal.
- **A limit found once.** With `--rpm`/`--tpm` the rate is the account's, as given. Without,
  each process's rate finder watches its own requests for the moments the server is full,
  and the limit is read at those moments from what the whole account sent
  (`pipeline.pace.reading`): every process tells the store what it sent and what was refused,
  by the hundredth of a second. The rate read is the account's, and every process paces at
  it; only the process whose reading is in force probes above it, for all. A pause one
  process is asked for (a 429 trend, a Retry-After for the pool) is the pool's: every
  process waits it out.
- **The store goes away.** Each process goes on alone at its share of the last shared rate
  (the rate over the processes seen, or over the job's shards if more), says so once, and
  rejoins when the store is back.
  Nothing is lost; the limit is exceeded by no more than the leases in hand.

The key names the account by a hash of the base URL and the API key, never the key itself,
and expires when unused. The store's URL is never shown with its password.
"""

from __future__ import annotations

import asyncio
import math
import os
import socket
from collections import deque
from collections.abc import Callable

import anyio

from pipeline.pace.accountlog import AccountLog, said
from pipeline.pace.lease import LATE, TokenLeases
from pipeline.pace.local import TIMER_SLACK, Pacer
from pipeline.pace.reading import READ_AFTER, Moment, Readings
from pipeline.pace.store import AccountStore, Ask, StoreAway

LEASE_SECONDS = 0.1  # of the account's rate, in one lease...
QUICK_LEASE = (
    0.02  # ...or while it ramps up, or was full lately: a pause then reaches every process this soon
)
MIN_LEASE = 4  # starts in a lease at least, once a pace is known: at a low rate, one call for a few requests
# Starts in one lease at most: a tenth of a second at 100,000 a second (the ramp's top). A rate
# given or stated far past what a server serves (x-ratelimit-limit-requests: 2**63 - 1, a
# gateway's "unlimited"; --rpm 1e12) asked for 10**16 starts at once, each a float in memory:
# gigabytes in seconds, the loop held.
MAX_LEASE = 10_000
SYNC_IDLE = 1.0  # seconds between calls to the store when nothing is wanted of it sooner
# The same while the account ramps up, or its server was full lately (WATCH_AFTER): a pause
# then reaches every process this soon. Told only with a lease, it reached each a lease
# later, and the starts leased before it went on into the refusals: 20 to 40 refusals where 10
# were paid at eight shards finding 40 a second.
SYNC_QUICK = 0.02
SYNC_GAP = 0.005  # seconds at least between two calls
WATCH_AFTER = 2.0  # seconds after the server was full that leases are QUICK_LEASE long
TELL_WITHIN = 0.02  # seconds a refusal waits to be told at most (one of a run the store saw)
RETRY_EVERY = 0.2  # seconds between attempts to reach a store that went away
REJOIN = 1.0  # seconds after coming back that a process goes no faster than alone


class SharedPacer(Pacer):
    """A `Pacer` whose starts (and tokens) come from leases of the account's shared pace."""

    def __init__(
        self,
        store: Callable[[], AccountStore],
        shown: str,
        *,
        request_rate: float | None = None,
        token_rate: float | None = None,
        processes: int = 1,
        say: Callable[[str], None] = print,
    ) -> None:
        self.store = store  # opens a connection to the account's store
        self.shown = shown  # the store, as said to a person (never with a password)
        self.say = say
        self.given = request_rate or 0.0  # the account's rates, as given (with the margin)
        self.given_tokens = token_rate or 0.0
        self.shared = self.given  # the rate in force for the account, given or found
        # Processes seen lately, never fewer than the job's shards: a store just restarted has
        # seen only the one that came back first, and each share is of them all.
        self.members = self.processes = max(processes, 1)
        self.leads = True  # whose reading is in force: it alone probes upward, for all
        self.alone = False  # the store is away: paced locally at our share
        self._pid = f"{socket.gethostname()}:{os.getpid()}"
        self._slots: deque[float] = deque()  # leased start times, on the loop's clock
        self._leases = TokenLeases()  # leased tokens in hand
        self._want = 0  # starts wanted from the store now
        self._want_tokens = 0.0
        self._found: float | None = None  # a found rate to publish (-1 when none)
        self._pause_for = 0.0  # a pause to publish
        self.account_log = AccountLog()  # ours, by the hundredth; and the store's clock on ours
        self._readings = Readings()
        self._on_full: Callable[[float, bool], None] | None = None
        self._full_seen: float | None = None  # the account's last full moment we know of
        self._resume_seen = -1.0  # and when the server had room again after it (the store's clock)
        self._answered = 0  # requests let through, not yet told
        self._watch_until = 0.0  # leases are short till then: the server was full lately
        self._booting = not (self.given or self.given_tokens)  # no limit known: the account ramps up
        self._resume_at = 0.0  # back from going alone: no leased start before this
        self._last_start = 0.0  # the last leased start used
        self._solo_until = 0.0  # just back: no faster than alone till then
        self._wake = asyncio.Event()
        super().__init__(request_rate=request_rate, token_rate=token_rate)

    # -- what the rate finder and the gate see: the account's rates ----------------------------

    def set_rates(self, *, request_rate: float | None, token_rate: float | None) -> None:
        self.given_tokens = token_rate or 0.0  # given, or stated by the server (set_token_rate)
        if not self.given and request_rate and request_rate != self.shared:
            found = request_rate  # the account's: readings are of the account
            if self.shared and found > self.shared and not self.leads and not self._booting:
                return  # the process whose reading is in force probes for all, or N would climb N times as fast
            self._found = self.shared = found
            self._wake.set()
        self._apply()

    def state_request_rate(self, rate: float) -> None:
        if not self.given:
            self._found = self.shared = rate  # the account's, as the server states it
            self._wake.set()
            self._apply()

    @property
    def request_rate(self) -> float | None:
        return self.shared or None

    @property
    def token_rate(self) -> float | None:
        return self.given_tokens or None

    # -- the account's send log, and readings from it ------------------------------------------

    def reads_account(self) -> bool:
        return not self.given

    def sent(self, at: float) -> None:
        self.account_log.sent(at)

    def answered(self) -> None:
        self._answered += 1

    def refused(self, sent_at: float, resume: float) -> None:
        at = self.account_log.refused(sent_at, resume)
        if at is not None and at >= self._resume_seen:
            # Told at once: a run of refusals across the account shows in the store. One of a
            # run the store has seen (sent before the room it told) is no news: told within
            # TELL_WITHIN, for the readings.
            self._wake.set()

    def watch(self, then: Callable[[float, bool], None]) -> None:
        self._on_full = then

    def read_full(self, at: float, resume: float, then: Callable[[float, bool], None]) -> None:
        offset = self.account_log.offset
        if offset is None or self.alone:
            return  # alone, the last shared pace holds: there is no account to read
        # Read up to the refused request, and over the time up to it: its answer may come back
        # long after (a busy server or machine), and what was sent meanwhile is not counted.
        self._readings.add(Moment(at + offset, min(resume, at) + offset), self._now(), then)
        self._wake.set()

    def pause(self, seconds: float) -> None:
        super().pause(seconds)
        self._pause_for = max(self._pause_for, seconds)
        self._wake.set()

    def settle(self, reserved: int, used: int) -> None:
        if self.alone or not self.given_tokens:
            super().settle(reserved, used)
        elif used < reserved:  # not sent, or not counted: in hand again for our next requests
            self._leases.give_back(reserved - used, self._now())
            self._reschedule()
        elif used > reserved:
            self._leases.charge(used - reserved)

    # -- the local pacer's clocks, fed by leases ----------------------------------------------

    def _apply(self) -> None:
        """The local clocks at our share of the account's pace: what we go at alone, and no
        faster just back (`_solo_until`); while the store is there, leases pace us."""
        share = self.shared / max(self.members, 1)
        self._request_interval = 1.0 / share if share else 0.0
        self._token_rate = self.given_tokens / max(self.members, 1)
        self._leases.rate = self.given_tokens
        # Given or not, every start is leased (before a limit is found, at the ramp's).
        self._free = not (self.shared or self.given_tokens or (self._booting and not self.alone))
        self._reschedule()

    def _ready_at(self, tokens: int) -> float:
        if self.alone:
            return super()._ready_at(tokens)
        at = self._paused_until
        if self._booting and not self.shared:
            self._ask(starts=True)  # the first call to the store tells the ramp's rate
            return math.inf
        if self.shared:
            # A start left unused is gone: spent late, it would add to another's stretch (a
            # loop a little behind, on a busy machine, may still use it).
            late = max(self._now() - LATE, self._resume_at)
            while self._slots and self._slots[0] < late:
                self._slots.popleft()
            if not self._slots:
                # Asked for when the pause ends (the store leases none before), and no start
                # till then: within the timer's slack of it, a time given here was a start, and
                # every waiter went at once, unleased.
                if at > self._now() + TIMER_SLACK:
                    return at
                self._ask(starts=True)
                return math.inf
            at = max(at, self._slots[0])
        if self.given_tokens and tokens:
            ready = self._leases.ready_at(tokens, self._now())
            if ready is None:
                self._ask(tokens=tokens)
                return math.inf
            at = max(at, ready)
        if self._solo_until:
            at = max(at, super()._ready_at(tokens))
        return at

    def _take(self, tokens: int, start: float) -> int:
        if self.alone:
            return super()._take(tokens, start)
        if self._solo_until:
            if start > self._solo_until:
                self._solo_until = 0.0
            else:
                super()._take(tokens, start)
        if self.shared and self._slots:
            self._last_start = self._slots.popleft()
            if len(self._slots) < self._lease() / 2:
                self._ask(starts=True)  # the next lease before this one runs out
        if not (self.given_tokens and tokens):
            return 0
        self._leases.take(tokens, start)
        if self._leases.held < tokens:
            self._ask(tokens=tokens)  # the next lease before these run out
        return tokens

    def _lease(self) -> int:
        """Starts to ask for at once (and tokens, likewise): a tenth of a second of the
        account's rate, split among the processes, so that together they hold a tenth of a
        second ahead, not N tenths (what a process that ends holds is lost to the others); a
        few starts at least, so that at a low rate a call serves a few requests. While the
        account ramps up, or was full lately, a fiftieth: a pause reaches every process at its
        next lease, and what it held at the ramp's rate, or the old pace, goes to the server."""
        if not self.shared:
            return 1 if self._booting else 0
        quick = self._booting or self._now() < self._watch_until
        starts = math.ceil(self.shared * (QUICK_LEASE if quick else LEASE_SECONDS) / max(self.members, 1))
        return min(max(1 if quick else MIN_LEASE, starts), MAX_LEASE)

    def _ask(self, *, starts: bool = False, tokens: float = 0.0) -> None:
        if starts and not self._want:
            self._want = self._lease()
        if tokens and not self._want_tokens:
            # A few requests' worth at least, as starts are leased: one request's at a time,
            # a start waited a call for its tokens, and was gone by then.
            share = self.given_tokens * LEASE_SECONDS / max(self.members, 1)
            self._want_tokens = max(tokens * MIN_LEASE, share)
        self._wake.set()

    # -- the store -------------------------------------------------------------------------------

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
        self._loop = loop
        try:
            while True:
                try:
                    await self._sync(store, loop)
                except StoreAway as e:
                    self._away(e.reason)
                    await anyio.sleep(RETRY_EVERY)
                    continue
                try:
                    await self._readings.read(store, loop, self.alone)
                except StoreAway as e:
                    self._away(e.reason)
                    continue
                # A call when a lease is wanted, a refusal or a rate or a pause is to be told;
                # else now and then, to tell what was sent and be seen (often while the account
                # ramps up or was full lately: SYNC_QUICK). A reading waiting for
                # the account's log learns how far the store holds it from the calls made for
                # leases meanwhile (every process's, at any rate), or reads when it has waited
                # enough: calls of their own to ask, every 20 ms, were most of them at 3,000 a
                # minute.
                now = loop.time()
                quick = self._booting or now < self._watch_until
                wait = TELL_WITHIN if self.account_log.refusals else SYNC_QUICK if quick else SYNC_IDLE
                wait = self._readings.wait(now, wait)
                with anyio.move_on_after(max(wait, 0.0)):
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
        sent_at = loop.time()
        try:
            r = await store.call(
                Ask(
                    self._pid,
                    want=want,
                    want_tokens=want_tokens,
                    given=self.given,
                    given_tokens=self.given_tokens,
                    found=found,
                    pause_for=pause_for,
                    log=said(log),
                    holds=bool(self._slots),
                    answered=answered,
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
        if self._booting and not r.booting:
            self._slots.clear()  # leased at the ramp's rate, not at the pace found
        self.leads, self._booting = r.leads, r.booting
        self._readings.reported = r.reported
        offset = (sent_at + now) / 2 - r.now  # the store's clock on ours
        self.account_log.offset = -offset
        if self._full_seen is not None and r.full_at > self._full_seen and self._on_full is not None:
            moment = Moment(r.full_at, r.full_resume)  # seen full by the account: read it
            self._readings.add(moment, now, self._on_full, after=READ_AFTER)
        self._full_seen = max(r.full_at, self._full_seen or -1.0)
        self._resume_seen = max(self._resume_seen, r.full_resume)
        if r.full_at > 0:
            self._watch_until = max(self._watch_until, r.full_resume + offset + WATCH_AFTER)
        self._back()
        self.members = max(r.members, self.processes)
        if not self.given:
            self.shared = r.rate
        if r.paused + offset > self._paused_until:
            self._paused_until = r.paused + offset
            if self._booting:
                # Starts leased at the ramp's rate ran into the limit: spent when the pause
                # ends they would all go at once, thousands a second.
                self._slots.clear()
        if r.start >= 0 and r.rate > 0:
            first = r.start + offset
            self._slots.extend(first + i / r.rate for i in range(r.granted))
        if r.token_start >= 0:
            self._leases.add(r.token_start + offset, want_tokens)
        self._apply()

    def _away(self, reason: str) -> None:
        if not self.alone:
            self.alone = True
            self._slots.clear()
            self._leases.clear()
            # The local clocks start now: left at their last use, they would let every
            # waiter go at once to catch up.
            now = self._now()
            # Alone, the next start keeps its distance from the last leased one (`_apply`
            # keeps the interval at our share).
            self._next_request = max(self._next_request, now, self._last_start + self._request_interval)
            self._next_token = max(self._next_token, now)
            self.say(
                f"pipeline: the shared limit's store {self.shown} cannot be reached "
                f"({reason}); going on alone at a share of the last shared pace "
                f"({self._described()}), and rejoining when it is back"
            )
            self._apply()

    def _back(self) -> None:
        if self.alone:
            self.alone = False
            # No leased start before the next one going alone would have allowed: a start
            # then would come on top of the last ones made alone. And for a while no faster
            # than alone: the others may not be back yet, and still send their shares alone.
            self._resume_at = self._next_request
            self._solo_until = self._now() + REJOIN
            self.say(f"pipeline: the shared limit's store {self.shown} is back; pacing together again")

    def _described(self) -> str:
        n, paces = max(self.members, 1), ((self.shared, "requests"), (self.given_tokens, "tokens"))
        said = [f"{r * 60 / n:,.0f} {what} a minute of {r * 60:,.0f}" for r, what in paces if r]
        return "; ".join(said) or "no pace found yet"
