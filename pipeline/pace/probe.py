"""Trying a pace above the limit known, to learn that it rose, at a bounded cost when it did not.

A server that raises its limit (a tier upgrade, an upstream recovering) says nothing: only a
pace above the old limit that goes unrefused shows it. Once a pace has held a while, the rate
finder asks the probe for the pace to try, once a second while the pace binds. Its curve is
CUBIC's (Ha, Rhee and Xu, 2008; RFC 9438), with the limit known as the window of the last loss:

    rate(t) = limit * (1 + C (t - K)^3),    C = (1 - HOLD) / K^3

It starts at the pace held (HOLD of the limit, t = 0) and flattens as it reaches the limit
(t = K), so that a probe of a limit that did not move crosses it slowly and is refused for a
request or two; past it, the longer nothing is refused, the faster it climbs (18 % a second at
most): a limit that rose 2.5 times is reached in a quarter of a minute.

A refused probe sends the pace back at once (the finder's doing); the next waits SETTLE s at
least and EVERY requests for each refusal it cost: its own (those in flight with it, as many as
load delays it, are one overshoot) and those sent in the TAIL seconds after (the rest of a
server's second; a bucket refilled continuously, that let a probe through on what the pace under
its refill saved: the finder took that for the limit, and reads it again), unless the pace then
falls (they were the fall's). About one request in EVERY at most, a refusal or two a minute at
3,000 a minute; a rise is found within 25 s at 20 a second and more, whatever the probe's phase.
"""

from __future__ import annotations

SETTLE = 10.0  # seconds at a pace before probing above it
EVERY = 200  # requests the next probe waits for each refusal the last one cost
K = 3.0  # seconds for the probe to reach the limit known from the pace held under it
MAX_STEP = 1.5  # seconds of the curve a call may advance (the pace did not bind in between)
TAIL = 2.0  # seconds after a refused probe whose refusals it is charged for
FELL = 0.9  # a pace read under this share of the one a refused probe went back to: a fall


class Probe:
    def __init__(self, hold: float) -> None:
        self.hold = hold  # the pace, as a share of the limit known
        self.after = 0.0  # no probing before this time
        self._base: float | None = None  # the limit when the probe began (None: not probing)
        self._elapsed = 0.0  # seconds along the curve
        self._last = 0.0  # when the curve last advanced
        self._tail, self._back = 0.0, 0.0  # refusals until then are the last probe's; its pace back

    def settle(self, now: float, pace: float | None) -> None:
        """A new pace: hold it SETTLE seconds (or as a refused probe said) before probing."""
        if pace is not None and pace < FELL * self._back:  # the refusals since were a fall's
            self.after, self._tail = now, 0.0
        self.after = max(self.after, now + SETTLE)
        self._base = None

    def refused(self, now: float, rate: float) -> None:
        """A probe was refused: the pace goes back to `rate`, or to the one held before it (a
        bucket's savings may have passed for more), for SETTLE seconds and EVERY requests."""
        if self._base is not None:
            rate = min(rate, self._base * self.hold)
        self._base = None
        self._tail = now + TAIL
        self._back = max(rate, 1e-9)
        self.after = max(self.after, now + max(SETTLE, EVERY / self._back))

    def charge(self, now: float, sent: float) -> None:
        """A refusal of a request sent soon after a refused probe: its cost, EVERY requests more."""
        if self._tail - TAIL <= sent and now < self._tail:
            self.after += EVERY / self._back

    @property
    def climbing(self) -> bool:
        return self._base is not None  # a probe is under way

    def next(self, now: float, limit: float) -> float | None:
        """The pace to try now, while the pace binds, above HOLD of `limit` (None: keep it)."""
        if now < self.after:
            return None
        if self._base is None:
            self._base, self._elapsed, self._last = limit, 0.0, now
        self._elapsed += min(now - self._last, MAX_STEP)
        self._last = now
        t = self._elapsed - K
        curve = self._base * (1 + (1 - self.hold) / K**3 * t**3)
        return max(curve, limit * self.hold)
