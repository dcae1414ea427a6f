"""Within one run, identical requests in flight at once are sent once (issue 23, point 2).

The first request of a key is sent; one of the same key that comes while it is in flight
waits for it, by awaiting its event (no polling), and takes its outcome when that outcome can
be shared (an answer); when it cannot (a failure, or the run abandoned the first), the first
waiter to wake is sent itself, and the others wait for that one in turn. A failure is never
handed to a request that was not sent. A key that failed `FAILING` times in a row is failing
(a text every request of which a provider refuses, a moderation backlog's spam repeated a
thousand times): the requests that waited for it are then sent all at once, as without the
sharing, where one by one a thousand of them took a thousand round trips.

Generic over the outcome, so that the worker's types stay its own: the caller says which
outcomes may be shared, and turns a shared one into its request's (marked reused).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import anyio

T = TypeVar("T")
FAILING = 2  # failures of a key in a row after which its waiters are sent at once


class _Flight(Generic[T]):
    __slots__ = ("done", "failed", "outcome", "waiting")

    def __init__(self, failed: int = 0) -> None:
        self.done = anyio.Event()
        self.outcome: T | None = None  # set when shareable
        self.waiting = 0
        self.failed = failed  # flights of its key that ended unshared just before it


class Inflight(Generic[T]):
    """The keys in flight now, each with what its waiters await."""

    def __init__(self, shareable: Callable[[T | None], bool] = lambda outcome: outcome is not None) -> None:
        self._flights: dict[bytes, _Flight[T]] = {}
        self._shareable = shareable
        self.shared = 0  # outcomes handed to a waiter, in all

    def __len__(self) -> int:
        return len(self._flights)

    def __contains__(self, key: bytes) -> bool:
        """Whether a request of `key` is in flight now (one more would wait for it)."""
        return key in self._flights

    def waiting(self, key: bytes) -> int:
        """How many requests wait on the one of `key` in flight."""
        flight = self._flights.get(key)
        return 0 if flight is None else flight.waiting

    async def once(self, key: bytes, send: Callable[[], Awaitable[T | None]]) -> tuple[T | None, bool]:
        """`send()`'s outcome, or that of a request of the same key in flight now; with
        whether it is another's (shared). Cancelled while waiting, nothing is sent; cancelled
        while sending, the waiters are woken and one of them is sent (all of them, once the
        key has failed `FAILING` times in a row)."""
        failed = 0
        while True:
            flight = self._flights.get(key)
            if flight is None:
                break
            flight.waiting += 1
            try:
                await flight.done.wait()
            finally:
                flight.waiting -= 1
            if flight.outcome is not None:
                self.shared += 1
                return flight.outcome, True
            failed = flight.failed + 1
            if failed >= FAILING:
                return await send(), False
        flight = self._flights[key] = _Flight(failed)
        outcome: T | None = None
        try:
            outcome = await send()
        finally:
            del self._flights[key]
            if self._shareable(outcome):
                flight.outcome = outcome
            flight.done.set()
        return outcome, False
