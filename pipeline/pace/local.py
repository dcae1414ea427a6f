"""Pacing: requests start evenly spaced at a rate, first come first served.

Two budgets, each a virtual clock in the manner of GCRA (the ATM Forum's generic cell rate
algorithm): `_next_request` is the earliest time the next request may start, and advances by
one interval per start; `_next_token` does the same in token units, advanced by each
request's reserved estimate, and by `settle` once the server's count is known: further for an
answer that used more, back for a request it did not count (the gate's rule, `pipeline.pace.gate`).
A request waits until both clocks and any pool-wide pause allow it.

Waiting is by awaiting: waiters sit in one FIFO queue and one loop timer, set for the exact
instant the head may go, releases them (after aiolimiter). The queue keeps big requests from
being starved by small ones. With no limit set and no pause, `acquire` costs one check.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable

TIMER_SLACK = 0.001  # seconds


class Pacer:
    """Starts requests at `request_rate` a second and reserved tokens at `token_rate` a
    second (either may be None: no limit)."""

    def __init__(self, *, request_rate: float | None = None, token_rate: float | None = None) -> None:
        self._request_interval = 0.0
        self._token_rate = 0.0
        self._next_request = 0.0
        self._next_token = 0.0
        self._paused_until = 0.0
        self._waiters: deque[tuple[int, asyncio.Future[int]]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.waits = 0  # acquires that had to queue: tells whether the pacer is what binds
        self._closed = False  # the run stopped: nobody waits any more
        self.set_rates(request_rate=request_rate, token_rate=token_rate)

    # -- settings ------------------------------------------------------------------------------

    def set_rates(self, *, request_rate: float | None, token_rate: float | None) -> None:
        self._request_interval = 1.0 / request_rate if request_rate else 0.0
        self._token_rate = token_rate or 0.0
        self._free = not request_rate and not token_rate
        self._reschedule()

    def set_request_rate(self, rate: float | None) -> None:
        self.set_rates(request_rate=rate, token_rate=self.token_rate)

    def state_request_rate(self, rate: float) -> None:
        """The rate the server states in its headers: the account's (a shared pace takes it
        as given, where a rate read from this process's own requests is its share)."""
        self.set_request_rate(rate)

    def set_token_rate(self, rate: float | None) -> None:
        self.set_rates(request_rate=self.request_rate, token_rate=rate)

    @property
    def request_rate(self) -> float | None:
        return 1.0 / self._request_interval if self._request_interval else None

    @property
    def token_rate(self) -> float | None:
        return self._token_rate or None

    @property
    def holding(self) -> bool:
        """Whether requests are waiting for their turn now."""
        return bool(self._waiters)

    # -- the loop's clock ----------------------------------------------------------------------

    def _now(self) -> float:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop.time()

    # -- acquiring -----------------------------------------------------------------------------

    def _ready_at(self, tokens: int) -> float:
        at = self._paused_until
        if self._request_interval:
            at = max(at, self._next_request)
        if self._token_rate and tokens:
            at = max(at, self._next_token)
        return at

    def _take(self, tokens: int, start: float) -> int:
        """Book a start at `start`: the scheduled instant, not when a late timer ran, so
        timer lateness does not add up into a lower rate. Returns the tokens booked."""
        if self._request_interval:
            self._next_request = max(self._next_request, start) + self._request_interval
        if self._token_rate and tokens:
            self._next_token = max(self._next_token, start) + tokens / self._token_rate
            return tokens
        return 0

    async def acquire(self, tokens: int = 0) -> int:
        """Wait for this request's turn; `tokens` is its estimate. Returns the tokens reserved
        for it: its estimate if a token pace is in force when it starts (one the server
        states may become known while it waits), else none."""
        if (self._free and not self._paused_until) or self._closed:
            return 0
        now = self._now()
        if self._paused_until and self._paused_until <= now and not self._waiters:
            self._paused_until = 0.0
        if not self._waiters and self._ready_at(tokens) <= now:
            return self._take(tokens, now)
        assert self._loop is not None
        self.waits += 1
        future: asyncio.Future[int] = self._loop.create_future()
        self._waiters.append((tokens, future))
        if len(self._waiters) == 1:
            self._reschedule()
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                # Released, then cancelled before it could start: hand the turn back.
                self.settle(future.result(), 0)
            raise
        finally:
            if self._waiters and self._waiters[0][1] is future:
                self._reschedule()

    def _release(self) -> None:
        self._timer = None
        # uvloop's timers keep milliseconds and may fire that much early: a start due within
        # that is due now, or the timer would be set again and again until the clock catches up.
        now = self._now() + TIMER_SLACK
        while self._waiters:
            tokens, future = self._waiters[0]
            if future.done():  # cancelled while waiting
                self._waiters.popleft()
                continue
            at = self._ready_at(tokens)
            if at > now:
                break
            self._waiters.popleft()
            future.set_result(self._take(tokens, at))
        self._reschedule()

    def _reschedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters and self._waiters[0][1].done():
            self._waiters.popleft()
        if not self._waiters or self._loop is None:
            return
        at = self._ready_at(self._waiters[0][0])
        if at != math.inf:  # inf: a shared pace waits for its lease, which reschedules
            self._timer = self._loop.call_at(at, self._release)

    def wake_all(self) -> None:
        """The run stopped: let every waiter go and find out (no start is booked), and
        whoever comes later too."""
        self._closed = True
        while self._waiters:
            _, future = self._waiters.popleft()
            if not future.done():
                future.set_result(0)
        self._reschedule()

    # -- feedback ------------------------------------------------------------------------------

    def settle(self, reserved: int, used: int) -> None:
        """Correct a token reservation with what the request really used."""
        if self._token_rate and reserved != used:
            self._next_token += (used - reserved) / self._token_rate
            if used < reserved:
                self._reschedule()

    def reads_account(self) -> bool:
        """Whether a limit is read from what a whole account sent (a shared pace), not from
        this process's requests alone: see `read_full`."""
        return False

    def sent(self, at: float) -> None:
        """A request left at `at` (a shared pace tells the account's send log)."""

    def answered(self) -> None:
        """A request was let through (a shared pace's ramp grows on what gets through)."""

    def refused(self, sent_at: float, resume: float) -> None:
        """The request that left at `sent_at` was refused, the server having room at `resume`."""

    def watch(self, then: Callable[[float, bool], None]) -> None:
        """Call `then(rate, sure)` with the account's limit, read at every moment its server
        is seen full (by any of its processes)."""

    def read_full(self, at: float, resume: float, then: Callable[[float, bool], None]) -> None:
        """The server was full for the request that left at `at`, with room again at
        `resume`: read the account's limit there, and call `then(rate, sure)` with it."""
        raise NotImplementedError("only a shared pace reads an account")

    async def check(self) -> None:
        """Before anything is sent: can this pace work? (A shared one: is its store there?)"""

    async def run(self) -> None:
        """What the pace does for as long as the run goes (a shared one: keep in step)."""

    def pause(self, seconds: float) -> None:
        """Hold every request back for `seconds` (a server's Retry-After for the pool)."""
        until = self._now() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self._reschedule()

    def unpause(self) -> None:
        """The pause was another scope's: lift it."""
        self._paused_until = 0.0
        self._reschedule()

    @property
    def paused_until(self) -> float:
        return self._paused_until
