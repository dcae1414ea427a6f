"""A pace's budget leased from the account's store, so that its processes share one pace.

The store (Redis, or a Ray actor: `pipeline.pace.store`) keeps one virtual clock per account
in the manner of GCRA. A process asks for a lease of `n` starts and is given the stretch of
the shared timeline from `max(clock, now)` on, `n / rate` long, and spends its starts evenly
over it. Stretches never overlap, so the processes together start `rate` requests a second,
however many they are. Tokens, given or stated, likewise (`pipeline.pace.lease`). A lease is
a tenth of a second of the account's rate split among the processes (a fiftieth while it
ramps up), four starts at least, so that a call to the store serves several requests at any
rate. The calls are the link's (`pipeline.pace.link`).

The store away, a process goes on alone at its share of the last shared rate (over the
processes seen, or the job's shards if more), and rejoins when it is back: nothing is lost,
and the limit is exceeded by no more than the leases in hand.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from pipeline.pace.lease import LATE, TokenLeases
from pipeline.pace.link import StoreLink
from pipeline.pace.pacer import LocalBudget, Pacer
from pipeline.pace.store import AccountStore, Reply

LEASE_SECONDS = 0.1  # of the account's rate, in one lease...
QUICK_LEASE = 0.02  # ...or while it ramps up
MIN_LEASE = 4  # starts in a lease at least, once a pace is known
# Starts in one lease at most (a tenth of a second at the ramp's top, 100,000 a second): a rate
# stated far past any server's (2**63 - 1; --rpm 1e12) asked for 10**16 starts, a float each.
MAX_LEASE = 10_000
WATCH_AFTER = 2.0  # seconds after the server was full that a process holding starts syncs quickly
REJOIN = 1.0  # seconds after coming back that a process goes no faster than alone


class LeasedBudget:
    """Starts and tokens in hand, leased from the account's pace (see the module's text)."""

    def __init__(
        self, link: StoreLink, *, request_rate: float | None, token_rate: float | None, processes: int
    ):
        self.link = link
        self.given = request_rate or 0.0  # the account's rates, as given (with the margin)
        self.given_tokens = token_rate or 0.0  # given, or stated by the server
        self.shared = self.given  # the rate in force for the account, given or found
        # Processes seen lately, never fewer than the job's shards: a store just restarted has
        # seen only the one that came back first, and each share is of them all.
        self.members = self.processes = max(processes, 1)
        self.leads = True  # whose reading is in force: it alone probes upward, for all
        self.alone = False  # the store is away: paced locally at our share
        self.booting = not (self.given or self.given_tokens)  # no limit known: the account ramps up
        self.watch_until = 0.0  # quick syncs till then: the server was full lately
        self.local = LocalBudget()  # at our share: alone, and no faster just back
        self._slots: deque[float] = deque()  # leased start times, on the loop's clock
        self._leases = TokenLeases()  # leased tokens in hand
        self._resume_at = 0.0  # back from going alone: no leased start before this
        self._last_start = 0.0  # the last leased start used
        self._solo_until = 0.0  # just back: no faster than alone till then
        self._pace: Pacer | None = None
        self.free = False
        self.set_rates(request_rate, token_rate)

    def attach(self, pace: Pacer) -> None:
        self._pace = pace

    def _now(self) -> float:
        assert self._pace is not None
        return self._pace._now()

    # -- the account's rates -------------------------------------------------------------------

    @property
    def request_rate(self) -> float | None:
        return self.shared or None

    @property
    def token_rate(self) -> float | None:
        return self.given_tokens or None

    def set_rates(self, request_rate: float | None, token_rate: float | None) -> None:
        self.given_tokens = token_rate or 0.0
        if not self.given and request_rate and request_rate != self.shared:
            # Found: the account's (readings are of the account). The process whose reading is
            # in force probes for all, or N would climb N times as fast.
            if self.shared and request_rate > self.shared and not self.leads and not self.booting:
                return
            self.shared = request_rate
            self.link.publish(request_rate)
        self._apply()

    def state_request_rate(self, rate: float) -> None:
        if not self.given:
            self.shared = rate  # the account's, as the server states it
            self.link.publish(rate)
            self._apply()

    def _apply(self) -> None:
        """The local clocks at our share of the account's pace: what we go at alone, and no
        faster just back; while the store is there, leases pace us. (The pacer reschedules its
        queue after a rate it set; a reply or the store going away, here.)"""
        n = max(self.members, 1)
        self.local.set_rates(self.shared / n or None, self.given_tokens / n or None)
        self._leases.rate = self.given_tokens
        # Given or not, every start is leased (before a limit is found, at the ramp's).
        self.free = not (self.shared or self.given_tokens or (self.booting and not self.alone))

    # -- spending leases -----------------------------------------------------------------------

    def ready_at(self, tokens: int, now: float) -> float:
        if self.alone:
            return self.local.ready_at(tokens, now)
        at = 0.0
        if self.booting and not self.shared:
            self.link.ask(1)  # the first call to the store tells the ramp's rate
            return math.inf
        if self.shared:
            # A start left unused is gone: spent late, it would add to another's stretch.
            late = max(now - LATE, self._resume_at)
            while self._slots and self._slots[0] < late:
                self._slots.popleft()
            if not self._slots:
                if self.given_tokens and tokens and self._leases.ready_at(tokens, now) is None:
                    self._ask_tokens(tokens)  # in the same call: both leased from one instant
                self.link.ask(self._lease())
                return math.inf
            at = self._slots[0]
        if self.given_tokens and tokens:
            ready = self._leases.ready_at(tokens, now)
            if ready is None:
                self._ask_tokens(tokens)
                return math.inf
            at = max(at, ready)
        if self._solo_until:
            at = max(at, self.local.ready_at(tokens, now))
        return at

    def take(self, tokens: int, start: float) -> int:
        if self.alone:
            return self.local.take(tokens, start)
        if self._solo_until:
            if start > self._solo_until:
                self._solo_until = 0.0
            else:
                self.local.take(tokens, start)
        if self.shared and self._slots:
            self._last_start = self._slots.popleft()
            # The next lease before this one runs out, while requests wait for it: else a shard
            # ended holding the lease it asked for after its last request, lost to the others.
            if len(self._slots) < self._lease() / 2 and self._pace is not None and self._pace.holding:
                self.link.ask(self._lease())
        if not (self.given_tokens and tokens):
            return 0
        self._leases.take(tokens, start)
        if self._leases.held < tokens:
            self._ask_tokens(tokens)  # the next lease before these run out
        return tokens

    def settle(self, reserved: int, used: int) -> bool:
        if self.alone or not self.given_tokens:
            return self.local.settle(reserved, used)
        if used < reserved:  # not sent, or not counted: in hand again for our next requests
            self._leases.give_back(reserved - used, self._now())
            return True
        self._leases.charge(used - reserved)
        return False

    def _lease(self) -> int:
        """Starts to ask for at once: a tenth of a second of the account's rate, split among
        the processes (so that together they hold a tenth of a second ahead, not N tenths:
        what a process that ends holds is lost to the others); a fiftieth while the account
        ramps up (full lately, quick syncs tell a pause: leases of a start were a call a start)."""
        quick = self.booting
        if not self.shared:
            return 1 if quick else 0
        starts = math.ceil(self.shared * (QUICK_LEASE if quick else LEASE_SECONDS) / max(self.members, 1))
        return min(max(1 if quick else MIN_LEASE, starts), MAX_LEASE)

    def _ask_tokens(self, tokens: int) -> None:
        # A few requests' worth at least, as starts are leased: one request's at a time, a
        # start waited a call for its tokens, and was gone by then.
        self.link.ask(0, max(tokens * MIN_LEASE, self.given_tokens * LEASE_SECONDS / max(self.members, 1)))

    # -- the store's replies -------------------------------------------------------------------

    def granted(self, r: Reply, offset: float, tokens: float) -> None:
        """The store's reply `r`, its clock `offset` from ours; `tokens` leased if it leased any."""
        if self.booting and not r.booting:
            self._slots.clear()  # leased at the ramp's rate, not at the pace found
        self.leads, self.booting = r.leads, r.booting
        if r.full_at > 0:
            self.watch_until = max(self.watch_until, r.full_resume + offset + WATCH_AFTER)
        self.back()
        self.members = max(r.members, self.processes)
        if not self.given:
            self.shared = r.rate
        assert self._pace is not None
        paused = r.paused + offset
        if paused > self._pace.paused_until and self.booting:
            # Starts leased at the ramp's rate ran into the limit: spent when the pause
            # ends they would all go at once, thousands a second.
            self._slots.clear()
        if r.start >= 0 and r.rate > 0:
            first = r.start + offset
            self._slots.extend(first + i / r.rate for i in range(r.granted))
        if r.token_start >= 0:
            self._leases.add(r.token_start + offset, tokens)
        # Last: the pause wakes the queue, and a pause long over (told with every reply) let
        # it find no lease yet and ask for another.
        self._pace.pause_until(paused)
        self._apply()
        self._pace.reschedule()

    @property
    def holds(self) -> bool:
        """Whether a leased start is in hand that may still be spent (this process may send
        without calling): those gone late in a pause are dropped only when it ends."""
        return bool(self._slots) and self._slots[-1] >= max(self._now() - LATE, self._resume_at)

    def away(self) -> str | None:
        """The store cannot be reached: go on alone; returns what to say the first time."""
        if self.alone:
            return None
        self.alone = True
        self._slots.clear()
        self._leases.clear()
        # The local clocks start now (left at their last use, every waiter would go at once to
        # catch up), and the next start keeps its distance from the last leased one.
        now, local = self._now(), self.local
        local.next_request = max(local.next_request, now, self._last_start + local.interval)
        local.next_token = max(local.next_token, now)
        self._apply()
        assert self._pace is not None
        self._pace.reschedule()
        n, paces = max(self.members, 1), ((self.shared, "requests"), (self.given_tokens, "tokens"))
        said = [f"{r * 60 / n:,.0f} {what} a minute of {r * 60:,.0f}" for r, what in paces if r]
        return "; ".join(said) or "no pace found yet"

    def back(self) -> None:
        if self.alone:
            self.alone = False
            # No leased start before the next one going alone would have allowed, and for a
            # while no faster than alone: the others may not be back yet, and still send alone.
            self._resume_at = self.local.next_request
            self._solo_until = self._now() + REJOIN
            self.link.say(
                f"pipeline: the shared limit's store {self.link.shown} is back; pacing together again"
            )


def shared_pacer(
    store: Callable[[], AccountStore],
    shown: str,
    *,
    request_rate: float | None = None,
    token_rate: float | None = None,
    processes: int = 1,
    say: Callable[[str], None] = print,
) -> Pacer:
    """A pace whose budget is leased from the account's `store` (`shown` as said to a person:
    never with a password)."""
    link = StoreLink(store, shown, say)
    budget = LeasedBudget(link, request_rate=request_rate, token_rate=token_rate, processes=processes)
    link.budget = budget
    pacer = Pacer(budget)
    pacer.account = link
    return pacer
