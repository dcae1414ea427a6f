"""The account's limit, read from what every process of it sent (a shared pace's `Capacity`).

One process of sixteen sends a sixteenth of the account's requests: what it alone saw go
through before the server was full says little of the account's limit, and scaling it by its
share of the answers only adds noise. So a shared pace reads the limit from the account's send
log in the store (`pipeline.pace.store`), at the moments one of its processes found the server
full, as `Capacity` reads one process's: at the first moment, what the account sent and was
not refused in the second before; at later ones, what it sent after the first moment and was
not refused, up to the next moment it was full, over the time from when the server said it
had room again to when it said so next. Times are the store's clock.

A moment is read once the store holds every process's send log up to it (a process tells
its log with each call, and one holding no leased starts cannot send without calling), and
once what was in flight at it has had its answer; or after a while, whatever it holds.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pipeline.pace.capacity import AGAIN_WITHIN, MAX_FULLS
from pipeline.pace.store import LOG_TTL, AccountStore

# The log counts by the hundredth: the one a moment falls in is read too (what was sent in it
# after the moment was refused, and is taken off with the refusals).
HUNDREDTH = 0.01


@dataclass(frozen=True, slots=True)
class Moment:
    at: float  # when the first refused request of the run left (the store's clock)
    resume: float  # when the server said it would take requests again


class AccountCapacity:
    def __init__(self) -> None:
        self._moments: deque[Moment] = deque()

    async def read(self, store: AccountStore, moment: Moment) -> tuple[float, bool] | None:
        """Requests a second the account's server lets through, read at `moment`, and whether
        the reading spans a second at least; None for a moment of the same stretch of
        refusals as the last one (seen by another process, or by the store)."""
        moments = self._moments
        if moments and moment.at < moments[-1].resume:
            return None
        if moments and moment.at - moments[-1].resume > AGAIN_WITHIN:
            moments.clear()  # the server had room for a while since: a new stretch
        while moments and (moment.at - moments[0].resume > LOG_TTL / 2 or len(moments) >= MAX_FULLS):
            moments.popleft()
        moments.append(moment)
        if len(moments) == 1:
            sent, refused, first = await store.read(moment.at - 1.0, moment.at + HUNDREDTH)
            span = moment.at - first if first is not None and first > moment.at - 1.0 else 1.0
            return (sent - refused) / max(span, 1e-2), True
        since = moments[0]
        # Counted from the first moment on, not from when the server said it had room: every
        # request sent after it was full and not refused was let through after it had room,
        # however late it arrived (a server that queues) or how far apart the clocks were.
        sent, refused, _ = await store.read(since.at + HUNDREDTH, moment.at + HUNDREDTH)
        span = max(moment.resume - since.resume, 1e-2)
        # Nothing through between two moments close together (a bucket refilling a request at
        # a time, taken by another account's request or sent a hundredth late): less than
        # one over that time, read as one, not as nothing.
        return max(sent - refused, 1) / span, span >= 1.0
