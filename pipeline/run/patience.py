"""Whether a worker about to wait for lack of lines waits for a leader's answer (`run.grouping`)
rather than send a held line cold: each line sent cold writes its prefix into one of the
provider's few places, pushing out the prefix of a turn whose lines are on their way; but each
worker waiting is wall time lost where the pool, not the client's CPU, sets the pace.

A worker waits where leaders answer within `PATIENT` (their round trips averaged, the last few
counting most; none answered yet: not), none in flight has been out longer (one in a retry's
backoff, or of a slow model among fast ones, would keep the workers waiting that long), and
fewer than an eighth of the pool wait (bench prefix at 200 ms, with up to half of them waiting:
1.07x input order's wall; an eighth: 0.99x, 89 % cached). Real models answer in seconds: their
runs never wait.
"""

from __future__ import annotations

import time
from collections.abc import Callable

PATIENT = 0.5
RECENT = 0.25  # the weight of a leader's round trip in the average
IDLE_SHARE = 8  # the pool over the workers that may wait


class Patience:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.round_trip: float | None = None  # leaders' round trips, averaged

    def answered(self, lead_at: float) -> None:
        """A leader sent at `lead_at` (on `clock`) has its answer."""
        took = self.clock() - lead_at
        last = self.round_trip
        self.round_trip = took if last is None else last + RECENT * (took - last)

    def waits(self, *, idle: Callable[[], int], pool: int, oldest: Callable[[], float | None]) -> bool:
        """Whether a worker waits, with `idle()` of the `pool`'s workers waiting and the oldest
        leader in flight sent at `oldest()` (None: none is). (Asked only where leaders answer
        soon: at real models' latencies, no more than the average.)"""
        last = self.round_trip
        if last is None or last >= PATIENT or IDLE_SHARE * idle() >= pool:
            return False
        sent = oldest()
        return sent is None or self.clock() - sent < PATIENT
