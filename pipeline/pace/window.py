"""How many requests may be in flight at once: `Slots`, and the `Window` that grows while
nothing is refused and is cut when the server pushes back."""

from __future__ import annotations

import asyncio
import math
from collections import deque

RAMP = 0.25  # seconds for the in-flight window to double while nothing is refused


class Slots:
    """At most `size` holders at once; the others wait their turn, first come first served,
    each on a future set when a slot is counted for it (no polling)."""

    def __init__(self, size: float) -> None:
        self.size = size
        self.taken = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._closed = False  # the run stopped: nobody waits any more

    async def acquire(self) -> None:
        if (self.taken < self.size and not self._waiters) or self._closed:
            self.taken += 1
            return
        self._waiting()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            await future  # the slot is counted for us when the future is set
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()
            raise

    def _waiting(self) -> None:
        """Someone is about to wait for a slot."""

    def release(self) -> None:
        self.taken -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.taken < self.size:
            future = self._waiters.popleft()
            if not future.done():
                self.taken += 1
                future.set_result(None)

    def wake_all(self) -> None:
        """The run stopped: let every waiter go and find out, and whoever comes later too."""
        self._closed = True
        while self._waiters:
            future = self._waiters.popleft()
            if not future.done():
                self.taken += 1
                future.set_result(None)


class Window(Slots):
    """At most `size` requests in flight. The size starts small and, while it holds requests
    back, doubles every `ramp` seconds, one request at a time (so never a burst): refusals
    come back in milliseconds, so time without them is what says more may go, however long
    the answers take. Each success adds half a request too (a gentler TCP slow start), which
    is quicker when answers are quick. `hold` ends the quick growth (then one a round trip),
    `shrink` cuts the window, `open` lifts it to the ceiling once a pace bounds the rate. It
    never exceeds `ceiling` (--concurrency): a server is never hit with everything at once
    before it has had time to refuse."""

    def __init__(self, ceiling: int, *, start: int = 16, ramp: float = RAMP) -> None:
        super().__init__(float(min(start, ceiling)))
        self.ceiling = ceiling
        self.threshold = float(ceiling)  # quick growth ends here
        self.ramp = ramp
        self._timer: asyncio.TimerHandle | None = None

    @property
    def in_flight(self) -> int:
        return self.taken

    def _waiting(self) -> None:
        self._ramp_later()  # it binds: grow with time

    def _ramp_later(self) -> None:
        if self._timer is None and self.size < self.threshold and self.ramp > 0:
            delay = self.ramp / (self.size * math.log(2))  # exponential: doubles every `ramp`
            self._timer = asyncio.get_running_loop().call_later(delay, self._ramp_step)

    def _ramp_step(self) -> None:
        self._timer = None
        if self.size < self.threshold:
            self.size = min(self.size + 1, self.threshold)
            self._wake()
        if self._waiters:
            self._ramp_later()

    def grow(self) -> None:
        """One request succeeded."""
        if self.size < self.ceiling:
            self.size = min(
                self.size + (0.5 if self.size < self.threshold else 1.0 / self.size), self.ceiling
            )
            self._wake()

    def hold(self) -> None:
        """The server pushed back once: stop growing quickly."""
        self.threshold = min(self.threshold, self.size)

    def open(self) -> None:
        """A pace bounds the rate now: let as many fly as it and the latency make."""
        self.size = self.threshold = float(self.ceiling)
        self._wake()

    def cut(self, size: float) -> tuple[float, float]:
        """Hold the window at `size` at most (the endpoint is down: a few probes at a time);
        returns what it was, for `restore`."""
        before = (self.size, self.threshold)
        self.size = self.threshold = min(size, self.size)
        return before

    def restore(self, before: tuple[float, float]) -> None:
        """The endpoint answers again: the window as it was before the cut."""
        self.size, self.threshold = max(before[0], self.size), max(before[1], self.threshold)
        self._wake()

    def shrink(self, keep: float = 0.5) -> None:
        """The server pushed back: cut the window (by half unless told) and grow slowly
        from there."""
        # Never below a few (nor, for a window already that small, above where it is).
        self.threshold = max(self.size * keep, min(4.0, self.size))
        self.size = self.threshold
