"""How many requests may be in flight: `Slots`, and the `Window` that grows while nothing is
refused and is cut when the server pushes back."""

from __future__ import annotations

import asyncio
import math
from collections import deque

RAMP = 0.25  # seconds for the in-flight window to double while nothing is refused
SPREAD = 2.0  # starts a round trip, per slot, at most while the window grows (TCP's pacing)
SLACK = 0.001  # seconds a timer may run early or late (uvloop keeps milliseconds)


class Slots:
    """At most `size` holders at once; the others wait, first come first served, each on a
    future set when a slot is counted for it."""

    def __init__(self, size: float) -> None:
        self.size = size
        self.taken = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False  # the run stopped: nobody waits any more
        self._spread = False  # starts are spaced in time: every one waits its turn

    async def acquire(self) -> None:
        if not self.take():
            await self.wait()

    def take(self) -> bool:
        """A slot now if one is free with nobody ahead (most starts), without a coroutine."""
        if (self.taken < self.size and not self._waiters and not self._spread) or self._closed:
            self.taken += 1
            return True
        return False

    async def wait(self) -> None:
        """A slot in turn, where `take` found none free (and at once if one is, after all)."""
        if self.take():
            return
        if self.taken >= self.size or self._waiters:
            self._waiting()  # it binds (a start only spread in time does not grow the window)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        if self._spread:
            self._wake_spread()
        try:
            await future  # the slot is counted for us when the future is set
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()
            raise

    def _waiting(self) -> None:  # someone is about to wait for a slot
        pass

    def release(self) -> None:
        self.taken -= 1
        if self._waiters:  # (none: nothing to wake, and most releases; a call the fewer)
            self._wake()

    def _wake(self) -> None:
        if self._spread:
            self._wake_spread()
            return
        while self._waiters and self.taken < self.size:
            future = self._waiters.popleft()
            if not future.done():
                self.taken += 1
                future.set_result(None)

    def _wake_spread(self) -> None:  # slots with start times (`Window`)
        pass

    def wake_all(self) -> None:
        """The run stopped: every waiter, and whoever comes later, goes to find out."""
        self._closed, self._spread = True, False
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                self.taken += 1
                future.set_result(None)


class Window(Slots):
    """At most `size` requests in flight (never above `ceiling`, --concurrency). It starts
    small and, while it holds requests back, doubles every `ramp` seconds: refusals come back
    in milliseconds, so time without them says more may go, however long answers take. Each
    success adds half a request (a gentler TCP slow start). While it grows, starts are spread
    at SPREAD times the rate answers come back (as TCP paces slow start): answers back
    together would send a clump, half as big again each round trip, and a server out of room
    in the middle of one refuses the rest before the first refusal is back."""

    def __init__(self, ceiling: int, *, start: int = 16, ramp: float = RAMP) -> None:
        super().__init__(float(min(start, ceiling)))
        self.start = self.size
        self.ceiling = ceiling
        self.threshold = float(ceiling)  # quick growth ends here
        self.ramp = ramp
        self._doubling = math.log(2) / ramp if ramp > 0 else 0.0  # the ramp's growth a second
        self._timer: asyncio.TimerHandle | None = None
        self._round = 0.0  # seconds an answer takes, smoothed (0: none yet)
        self._next = 0.0  # the loop's time of the next start, while they are spread
        self._until = 0.0  # ...and of the first after a stall
        self._spacer: asyncio.TimerHandle | None = None

    @property
    def in_flight(self) -> int:
        return self.taken

    def _wake_spread(self) -> None:
        if not self._waiters:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._spread = (self._round > 0 and self.size < self.ceiling) or now < self._until
        if not self._spread:
            if self._spacer is not None:
                self._spacer.cancel()
                self._spacer = None
            self._wake()
            return
        if self._spacer is not None:
            return  # its timer wakes the next
        back = 1 / self._round if self._round else math.inf
        rate = SPREAD * self.size * (back + self._doubling)
        while self._waiters and self.taken < self.size:
            at = self._until if self._until > self._next else self._next
            if at > now + SLACK:
                self._spacer = loop.call_at(at, self._spaced)
                return
            future = self._waiters.popleft()
            if not future.done():
                self.taken += 1
                future.set_result(None)
                # From when it was due, if a timer ran late: lateness does not lower the rate.
                self._next = (at if at > now - SLACK else now) + 1 / rate

    def _spaced(self) -> None:
        self._spacer = None
        self._wake()

    def stall(self, seconds: float) -> None:
        """Start nothing for `seconds` (until a refusal's fellows show whether the server is
        full); not at the ceiling, where scattered refusals could keep it standing still."""
        if self.size >= self.ceiling:
            return
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:  # no loop: nothing waits
            return
        self._until = max(self._until, now + seconds)
        self._spread = True

    def _waiting(self) -> None:  # it binds: grow with time
        if self._timer is None and self.size < self.threshold and self.ramp > 0:
            delay = self.ramp / (self.size * math.log(2))  # exponential: doubles every `ramp`
            self._timer = asyncio.get_running_loop().call_later(delay, self._ramp_step)

    def _ramp_step(self) -> None:
        self._timer = None
        if self.size < self.threshold:
            self.size = min(self.size + 1, self.threshold)
            self._wake()
        if self._waiters:
            self._waiting()

    def grow(self, latency: float | None = None) -> None:
        size = self.size
        if size < self.ceiling:
            if latency is not None:
                self._round = latency if not self._round else self._round + (latency - self._round) / 8
                self._spread = True
            self.size = min(size + (0.5 if size < self.threshold else 1.0 / size), self.ceiling)
            if self._waiters:
                self._wake()

    def hold(self) -> None:
        """The server pushed back once: stop growing quickly."""
        self.threshold = min(self.threshold, self.size)

    def open(self) -> None:
        """A pace bounds the rate now: as many fly as it and the latency make."""
        self.size = self.threshold = float(self.ceiling)
        self._until = 0.0
        self._wake()

    def restart(self) -> None:
        """A first limit read may be a bucket's savings: start small again and grow quickly,
        so that the next refusals are few if it was."""
        self.size, self.threshold, self._until = min(self.start, self.size), float(self.ceiling), 0.0

    def cut(self, size: float) -> tuple[float, float]:
        """At most `size` (the endpoint is down: a few probes at a time); returns what it
        was, for `restore`."""
        before = (self.size, self.threshold)
        self.size = self.threshold = min(size, self.size)
        return before

    def restore(self, before: tuple[float, float]) -> None:
        self.size, self.threshold = max(before[0], self.size), max(before[1], self.threshold)
        self._wake()

    def shrink(self, keep: float = 0.5) -> None:
        """Cut the window (by half unless told) and grow slowly from there; never below a few
        (nor, already that small, above where it is)."""
        self.threshold = max(self.size * keep, min(4.0, self.size))
        self.size = self.threshold
