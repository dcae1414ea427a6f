"""Who may work, and whether the run still sends.

`Control` is the run's state of dispatch: once stopped (an interrupt, a refused key, a
budget), nothing new is sent, whatever waits to be sent wakes up to find that out, and what
is in flight gets a bounded grace period.

`Crew` keeps `size` workers active, the rest standing by. A worker waiting out a retry's
backoff steps aside so that a stand-by worker takes its place, and steps straight back in
when the wait is over, its request in hand; the next active worker to finish a request
steps down to stand by in its stead. So backoff never leaves a connection idle, and while
nobody retries nobody waits here: an active worker keeps its place from one request to the
next.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from pipeline.errors import RunStopped
from pipeline.pace.window import Slots

if TYPE_CHECKING:
    from pipeline.job import Request


class Control:
    def __init__(self, *, grace: float = 30.0) -> None:
        self.grace = grace
        self.dispatching = True
        self.stopped: RunStopped | None = None
        self.interrupted = False
        self.in_flight = 0  # requests sent and not yet answered
        self.in_hand = 0  # requests a worker holds, from its reservation to its outcome
        self.work_scope: anyio.CancelScope | None = None
        self.on_stop: list[Callable[[], None]] = []  # wake whatever waits to send
        self._napping: set[asyncio.Future[None]] = set()

    def stop(self, reason: RunStopped | None = None) -> None:
        if reason is not None and self.stopped is None:
            self.stopped = reason
        if not self.dispatching:
            return
        self.dispatching = False
        for future in self._napping:
            if not future.done():
                future.set_result(None)
        for wake in self.on_stop:
            wake()
        if self.work_scope is not None:
            # Requests in flight get a bounded grace period to finish, then are cancelled.
            self.work_scope.deadline = min(self.work_scope.deadline, anyio.current_time() + self.grace)

    def interrupt(self) -> str:
        """The first Ctrl-C or SIGTERM: nothing new is sent, what is in flight gets the grace
        period. Returns what to tell the person who pressed it."""
        self.interrupted = True
        self.stop()
        n = self.in_flight
        if not n:
            return "pipeline: stopping: nothing is in flight; writing down what was done"
        return (
            f"pipeline: stopping: nothing new is sent; {n:,} request{'s' if n != 1 else ''} in flight "
            f"may finish within {self.grace:g}s; Ctrl-C again cancels them (they stay to do)"
        )

    def cancel(self) -> str:
        """The second one: what is in flight is cancelled at once."""
        if self.work_scope is not None:
            self.work_scope.cancel()
        n = self.in_flight
        return f"pipeline: cancelling {n:,} request{'s' if n != 1 else ''} in flight; they stay to do"

    async def nap(self, seconds: float) -> None:
        """Sleep `seconds`, or until the run stops dispatching if that comes first.

        A future and one timer, not a cancel scope with a deadline: under uvloop a timer may
        fire a little before its time, and anyio's deadline check then re-arms it again and
        again until the clock catches up, a busy loop of up to a millisecond per sleep."""
        if not self.dispatching:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _wake, future)
        self._napping.add(future)
        try:
            await future
        finally:
            timer.cancel()
            self._napping.discard(future)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


READ_AHEAD_BYTES = 64 * 1024 * 1024


class Refill:
    """The reader tops up the workers' request buffer by halves. Once it finds the buffer
    full, it waits until the workers have taken `batch` requests, rather than waking to put
    one back each time one is taken: on 50,000 requests at 50 ms that was 11,000 wake-ups of
    the reader, and about 10 % of the run's CPU.

    The buffer is bounded in bytes too (`max_bytes` of payload, READ_AHEAD_BYTES by default):
    big lines (inline images) wait in the file, not in memory. A line bigger than the whole
    budget still goes, alone."""

    def __init__(self, batch: int, max_bytes: int = READ_AHEAD_BYTES) -> None:
        self.batch = batch
        self.max_bytes = max_bytes
        self.held = 0  # payload bytes in the buffer
        self.owed = 0  # takes still to come before the reader wakes; 0 while it does not wait
        self._future: asyncio.Future[None] | None = None

    def fits(self, size: int) -> bool:
        return self.held == 0 or self.held + size <= self.max_bytes

    def put(self, size: int) -> None:
        self.held += size

    async def room(self, batch: int | None = None) -> None:
        """Wait until the workers have taken `batch` requests (or `wake` is called)."""
        future = self._future = asyncio.get_running_loop().create_future()
        self.owed = self.batch if batch is None else batch
        try:
            await future
        finally:
            self._future = None
            self.owed = 0

    def taken(self, size: int) -> None:
        """A worker took a request of `size` payload bytes from the buffer."""
        self.held -= size
        if self.owed:
            self.owed -= 1
            if self.owed <= 0:
                self.wake()

    def wake(self) -> None:
        future = self._future
        if future is not None and not future.done():
            future.set_result(None)


class Crew(Slots):
    """`size` workers active; the others stand by in the slots' queue."""

    @property
    def crowded(self) -> bool:
        return self.taken > self.size

    def rejoin(self) -> None:
        """A worker back from a backoff, its request in hand: in at once, even over the
        size; the next worker between two requests steps down to make up for it."""
        self.taken += 1


class Seat:
    """One worker's place in the crew."""

    def __init__(self, crew: Crew, control: Control) -> None:
        self.crew = crew
        self.control = control
        self.held = False

    async def take(self) -> None:
        await self.crew.acquire()
        self.held = True

    def give_up(self) -> None:
        if self.held:
            self.held = False
            self.crew.release()

    async def make_room(self) -> None:
        """Between two requests: step down if workers back from a backoff made the crew
        too many."""
        if self.crew.crowded:
            self.give_up()
            await self.take()

    async def backoff(self, seconds: float) -> None:
        """A retry's wait, spent out of the crew (and cut short if the run stops)."""
        self.give_up()
        await self.control.nap(seconds)
        self.rejoin()

    def step_out(self) -> bool:
        """Out of the crew for a wait (its model's pace), as for a backoff; whether it was in."""
        held = self.held
        self.give_up()
        return held

    def rejoin(self) -> None:
        self.crew.rejoin()
        self.held = True


class Aside:
    """Requests a worker set aside, by model, rather than wait with them: enough requests of
    their model wait for its pace already (`crowded`), and waiting too the worker would be
    lost to the other models' requests. At most `most` are held (the rest wait in workers,
    as every request did before); a worker takes one back once its model has room, or when
    nothing else is there to take."""

    def __init__(self, crowded: Callable[[str | None], bool], most: int) -> None:
        self.crowded = crowded
        self.most = most
        self.held = 0
        self._by_model: dict[str | None, deque[Request]] = {}

    def keep(self, request: Request) -> bool:
        """Set `request` aside if its model is crowded and there is room; whether it was."""
        if self.held >= self.most or not self.crowded(request.model):
            return False
        self._by_model.setdefault(request.model, deque()).append(request)
        self.held += 1
        return True

    def ready(self, *, any_model: bool = False) -> Request | None:
        """A request set aside whose model has room now (or, `any_model`, the first held)."""
        if not self.held:
            return None
        for model, held in self._by_model.items():
            if held and (any_model or not self.crowded(model)):
                self.held -= 1
                return held.popleft()
        return None
