"""A scope's pace: requests start evenly spaced, first come first served.

Waiters sit in one FIFO queue (so big requests are not starved by small ones), released by
one loop timer set for the instant the head may go (after aiolimiter). Its budget says when:
`LocalBudget`, two GCRA virtual clocks (the ATM Forum's generic cell rate algorithm), one in
starts and one in reserved tokens, corrected by `settle` once the server's count is known; or
`leased.LeasedBudget`, starts and tokens leased from the account's store. A pause (a server's
Retry-After for the pool) holds every request back. No limit and no pause: `take` is one check.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from pipeline.pace.tokens import TokenCount, says_tokens

if TYPE_CHECKING:
    from pipeline.errors import RequestError
    from pipeline.pace.link import StoreLink

TIMER_SLACK = 0.001  # seconds
Then = Callable[[float, bool], None]  # told the account's limit read: (requests a second, sure)


class Budget(Protocol):
    """Where a pace's starts and tokens come from (see the module's text)."""

    @property
    def free(self) -> bool: ...  # nothing to wait for: no rate, and no lease to wait for
    @property
    def request_rate(self) -> float | None: ...
    @property
    def token_rate(self) -> float | None: ...
    def attach(self, pace: Pacer) -> None: ...
    def set_rates(self, request_rate: float | None, token_rate: float | None) -> None: ...
    def state_request_rate(self, rate: float) -> None: ...
    def ready_at(self, tokens: int, now: float) -> float: ...  # math.inf: asked for, `reschedule` comes
    def take(self, tokens: int, start: float) -> int: ...
    def settle(self, reserved: int, used: int) -> bool: ...  # True: the head may go sooner


class LocalBudget:
    """Starts at `request_rate` and tokens at `token_rate` a second (None: no limit)."""

    def __init__(self, request_rate: float | None = None, token_rate: float | None = None) -> None:
        self.interval = self.tokens_a_second = self.next_request = self.next_token = 0.0
        self.set_rates(request_rate, token_rate)

    def attach(self, pace: Pacer) -> None:
        pass

    @property
    def request_rate(self) -> float | None:
        return 1.0 / self.interval if self.interval else None

    @property
    def token_rate(self) -> float | None:
        return self.tokens_a_second or None

    def set_rates(self, request_rate: float | None, token_rate: float | None) -> None:
        self.interval = 1.0 / request_rate if request_rate else 0.0
        self.tokens_a_second = token_rate or 0.0
        self.free = not request_rate and not token_rate

    def state_request_rate(self, rate: float) -> None:
        self.set_rates(rate, self.token_rate)

    def ready_at(self, tokens: int, now: float) -> float:
        at = self.next_request if self.interval else 0.0
        return max(at, self.next_token) if self.tokens_a_second and tokens else at

    def take(self, tokens: int, start: float) -> int:
        """Book a start at `start`: the scheduled instant, not when a late timer ran, so
        timer lateness does not add up into a lower rate. Returns the tokens booked."""
        if self.interval:
            self.next_request = max(self.next_request, start) + self.interval
        if self.tokens_a_second and tokens:
            self.next_token = max(self.next_token, start) + tokens / self.tokens_a_second
            return tokens
        return 0

    def settle(self, reserved: int, used: int) -> bool:
        if self.tokens_a_second and reserved != used:
            self.next_token += (used - reserved) / self.tokens_a_second
        return used < reserved


class Pacer:
    def __init__(
        self,
        budget: Budget | None = None,
        *,
        request_rate: float | None = None,
        token_rate: float | None = None,
    ) -> None:
        self.budget: Budget = budget or LocalBudget(request_rate, token_rate)
        self._paused_until = 0.0
        self._waiters: deque[tuple[int, asyncio.Future[int]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.waits = 0  # acquires that had to queue: tells whether the pacer is what binds
        self._closed = False  # the run stopped: nobody waits any more
        self.budget.attach(self)
        self.account: StoreLink | None = None  # the account's store, when its processes share the pace
        # What the server counts of a request's tokens. A shared pace does not probe it: each of
        # its processes would pay a probe's refusals on a server counting on arrival.
        self.tokens = TokenCount(probe=isinstance(self.budget, LocalBudget))

    def set_rates(self, *, request_rate: float | None, token_rate: float | None) -> None:
        self.budget.set_rates(request_rate, token_rate)
        self.reschedule()

    def set_request_rate(self, rate: float | None) -> None:
        self.set_rates(request_rate=rate, token_rate=self.token_rate)

    def set_token_rate(self, rate: float | None) -> None:
        self.set_rates(request_rate=self.request_rate, token_rate=rate)

    def state_request_rate(self, rate: float) -> None:
        """A rate the server states: the account's (a shared pace takes it whole, where one read
        from this process's own requests is its share)."""
        self.budget.state_request_rate(rate)
        self.reschedule()

    @property
    def request_rate(self) -> float | None:
        return self.budget.request_rate

    @property
    def token_rate(self) -> float | None:
        return self.budget.token_rate

    @property
    def holding(self) -> bool:
        return bool(self._waiters)

    def _now(self) -> float:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop.time()

    def _ready_at(self, tokens: int, now: float) -> float:
        if (paused := self._paused_until) > now + TIMER_SLACK:
            return paused  # nothing is asked of the budget before the pause ends
        at = self.budget.ready_at(tokens, now)
        return at if at > paused else paused

    def take(self, tokens: int = 0) -> int | None:
        """This request's turn where it has come, with nobody ahead (the tokens reserved, as
        `acquire` says), without a coroutine made and awaited; None: `wait`, to queue."""
        if (self.budget.free and not self._paused_until) or self._closed:
            return 0
        now = self._now()
        if self._paused_until and self._paused_until <= now and not self._waiters:
            self._paused_until = 0.0
        if not self._waiters and self._ready_at(tokens, now) <= now:
            return self.budget.take(tokens, now)
        return None

    async def acquire(self, tokens: int = 0) -> int:
        """Wait for this request's turn; returns the tokens reserved: its estimate `tokens` if
        a token pace is in force when it starts (one may be stated while it waits), else none."""
        taken = self.take(tokens)
        return taken if taken is not None else await self.wait(tokens)

    async def wait(self, tokens: int = 0) -> int:
        """`acquire` once `take` said None: in the queue, till its turn."""
        assert self._loop is not None
        self.waits += 1
        future: asyncio.Future[int] = self._loop.create_future()
        self._waiters.append((tokens, future))
        if len(self._waiters) == 1:
            self.reschedule()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Released, then cancelled before it could start: hand the turn back.
                self.settle(future.result(), 0)
            raise
        finally:
            if self._waiters and self._waiters[0][1] is future:
                self.reschedule()

    def _release(self) -> None:
        self._timer = None
        # uvloop's timers keep milliseconds and may fire that much early: a start due within
        # that is due now, or the timer would be set again and again until the clock catches up.
        now = self._now()
        while self._waiters:
            tokens, future = self._waiters[0]
            if future.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            at = self._ready_at(tokens, now)
            if at > now + TIMER_SLACK:
                break
            self._waiters.popleft()
            future.set_result(self.budget.take(tokens, at))
        self.reschedule()

    def reschedule(self) -> None:
        """Set the timer for the head of the queue (rates, leases or pause changed)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters and self._waiters[0][1].done():
            self._waiters.popleft()
        if not self._waiters or self._loop is None:
            return
        at = self._ready_at(self._waiters[0][0], self._loop.time())
        if at != math.inf:  # inf: a shared pace waits for its lease, which reschedules
            self._timer = self._loop.call_at(at, self._release)

    def wake_all(self) -> None:
        """The run stopped: every waiter, and whoever comes later, goes unbooked to find out."""
        self._closed = True
        while self._waiters:
            _, future = self._waiters.popleft()
            if not future.done():
                future.set_result(0)
        self.reschedule()

    def settle(self, reserved: int, used: int) -> None:
        """Correct a token reservation with what the request really used."""
        if reserved != used and self.budget.settle(reserved, used):
            self.reschedule()

    def answered(self, reserved: int, used: int) -> None:
        """Its answer used `used` tokens: settled as the server counts them (`tokens`)."""
        self.settle(reserved, self.tokens.counted(reserved, used, binding=self.holding))

    def failed(self, reserved: int, counted: bool, refusal: RequestError | None = None) -> None:
        """A request failed: its reservation `counted` by the server, or handed back. A refusal
        of the token limit's counts again what was handed back too soon (`tokens`)."""
        self.settle(reserved, reserved if counted else 0)
        if reserved and refusal is not None and says_tokens(refusal.message, refusal.limits):
            self.settle(0, self.tokens.refused())

    def pause(self, seconds: float) -> None:
        """Hold every request back for `seconds` (a server's Retry-After for the pool)."""
        self.pause_until(self._now() + seconds)
        if self.account is not None:
            self.account.paused(seconds)  # the pool's: every process waits it out

    def pause_until(self, until: float) -> None:
        if until > self._paused_until:
            self._paused_until = until
            self.reschedule()

    def unpause(self) -> None:
        """The pause was another scope's: lift it."""
        self._paused_until = 0.0
        self.reschedule()

    @property
    def paused_until(self) -> float:
        return self._paused_until

    async def check(self) -> None:
        """Before anything is sent: is a shared pace's store there?"""
        if self.account is not None:
            await self.account.check()

    async def run(self) -> None:
        """For as long as the run goes: a shared pace keeps in step with its store."""
        if self.account is not None:
            await self.account.run()
