"""The account's limit, read from what every process of it got through (a shared pace's `Capacity`).

One process of sixteen sees a sixteenth of the account's requests: too little, and too noisy
scaled up, to read the account's limit from. So a shared pace reads it from the account's log
in the store (`pipeline.pace.store`), at the moments the server was found full, as `Capacity`
reads one process's: at the first, what the account got through in the second before (the
server's, when it told its room within a second); at later ones, what it got through after an
earlier moment (the latest a second or more before) up to this one (`Moment.end`), over the
time between the rooms told after each (the store's clock). What got through is counted by
when the server admitted it, as its answer tells (`pipeline.pace.accountlog`), not by when it
was sent: 16 shards on two cores send seconds after they log a send, and a reading by send
came out at 0.4 to 0.8 of what the server let through.

A moment is read once the store holds every process's log of admissions up to it (told with
each call; one holding no leased starts and no request out cannot add to it without calling);
or after READ_WAIT and the least latency of answers, whatever it holds.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.pace.capacity import AGAIN_WITHIN, MAX_FULLS
from pipeline.pace.store import LOG_TTL, AccountStore

HUNDREDTH = 0.01  # the log counts by the hundredth: the one a moment falls in is read too
READ_WAIT = 1.0  # seconds a reading waits at most for the account's log, past its answers' latency
READ_EVERY = 0.02  # seconds between calls that learn whether the store holds them yet


@dataclass(frozen=True, slots=True)
class Moment:
    at: float  # when the first refused request of the run left (the store's clock)
    resume: float  # when the server said it would take requests again

    @property
    def end(self) -> float:
        """Admitted up to then, a request got through before this moment: up to the room told
        (within a second; the account pauses till then); with no pause, up to the refused one."""
        return min(self.resume, self.at + 1.0) if self.resume > self.at else self.at + HUNDREDTH


class AccountCapacity:
    def __init__(self) -> None:
        self._moments: deque[Moment] = deque()

    async def read(
        self, store: AccountStore, moment: Moment, by_answer: bool = True
    ) -> tuple[float, bool] | None:
        """Requests a second the server lets through, read at `moment`, and whether over a second
        at least; None for a moment of the last one's stretch (seen by another process, or the
        store). `by_answer`: what got through counted by admission, else as sent and not refused."""
        moments = self._moments
        if moments and moment.at < moments[-1].resume:
            return None
        if moments and moment.at - moments[-1].resume > AGAIN_WITHIN:
            moments.clear()  # the server had room for a while since: a new stretch
        while moments and (moment.at - moments[0].resume > LOG_TTL / 2 or len(moments) >= MAX_FULLS):
            moments.popleft()
        moments.append(moment)
        if len(moments) == 1:
            # The second before the room told, within a second (a server that counts by the
            # second: its own), else before the refused request; over the whole second even if
            # the account began within it: a server lets its second's requests through in any
            # part of it (a bucket its savings too), and 40 let through in the 0.46 s since the
            # ramp began read 86 a second, shards paced at it into a second and a third wave.
            last = moment.resume if moment.at < moment.resume < moment.at + 1.0 else moment.at
            got = await store.read(last - 1.0, last if last > moment.at else moment.at + HUNDREDTH)
            return got.admitted if by_answer else got.sent - got.refused, True
        # From the latest moment a second or more before (else the first): from the first, a
        # stretch sent under the limit (at a pace read low, or a machine behind) counted as the
        # server's, and each reading paced at came out lower (893, 678, 641, 591 a second where
        # 1,000 got through).
        since = next((m for m in reversed(moments) if moment.resume - m.resume >= 1.0), moments[0])
        # By send, from the moment, not its room: every request sent after the server was full
        # and not refused got through after it had room, however late it arrived.
        got = await store.read(since.end if by_answer else since.at + HUNDREDTH, moment.end)
        span = max(moment.resume - since.resume, 1e-2)
        # Nothing through between two moments close together (a bucket refilling one at a time,
        # taken by another account or sent a hundredth late): read as one, not as nothing.
        return max(got.admitted if by_answer else got.sent - got.refused, 1) / span, span >= 1.0


@dataclass(slots=True)
class _Reading:
    moment: Moment  # on the store's clock
    after: float  # on ours: not read before (its end has passed)
    due: float  # on ours: read then at the latest, the store's log whole or not
    then: Callable[[float, bool], None]


class Readings:
    """The moments the account was seen full, waiting to be read (see the module's text)."""

    def __init__(self) -> None:
        self._waiting: list[_Reading] = []
        self._capacity = AccountCapacity()
        self.reported = -math.inf  # the store holds every process's log and answers up to then (its clock)

    def add(self, moment: Moment, now: float, then: Callable[[float, bool], None], *, after: float) -> None:
        """Read `moment` (the store's clock) once its end has passed, at `after` (ours)."""
        self._waiting.append(_Reading(moment, after, now + READ_WAIT, then))

    def wait(self, now: float, wait: float, late: float) -> float:
        """Seconds till the store is asked again if a reading is whole, or it is read (`wait` at
        most); `late`: the least latency of answers lately, by which what was admitted up to
        a moment is told after it."""
        for r in self._waiting:
            after, due = r.after + late, r.due + late
            wait = min(wait, (min(after, due) if now < after else min(now + READ_EVERY, due)) - now)
        return wait

    async def read(
        self, store: AccountStore, loop: asyncio.AbstractEventLoop, alone: bool, late: float, by_answer: bool
    ) -> None:
        """Read the moments whose log the store holds whole, or that waited long enough."""
        while self._waiting:
            reading = self._waiting[0]
            now = loop.time()
            whole = reading.moment.end <= self.reported
            if not ((whole and now >= reading.after + late) or now >= reading.due + late):
                return
            read = await self._capacity.read(
                store, reading.moment, by_answer
            )  # StoreAway: kept, read when back
            self._waiting.pop(0)
            if read is not None and not alone:
                reading.then(*read)
