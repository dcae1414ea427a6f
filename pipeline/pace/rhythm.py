"""Telling a pace's own overshoot from scattered refusals, by their rhythm.

A limit read a few percent too high (a bucket's savings counted with its refill, or a limit
that fell a little) leaves the pace just above it: refused now and then, too few for a run
or for the share that reads the limit again, and as few as an aggregator's scattered
refusals, which must never take the pace down. Their rhythm tells them apart. A pace held
evenly above a limit is refused at a steady beat (one in every p / (p - limit) for a bucket,
the last of each second for a window per second); scattered refusals come at random, their
gaps as spread as they are long (geometric). GAPS gaps all within SPREAD of their mean (or
LEEWAY: a loop late by a few ms moves a refusal by a request or two) happen by chance once in
100,000 checks at 2 % or 5 % scattered, once in 5,000 at 10 % (once in 120 at 20 %, where runs
of four already read limits that are not there), and within about GAPS / (p - limit) seconds
of a pace above its limit.

Many refusals (over 15 % of the finder's two seconds of answers) read the limit again only
when a later window of answers, apart from the first, holds as many: a pace above its limit
is refused so window after window, scattered refusals by chance in one now and then. At 5 %
scattered, a window of 80 answers holds 13 or more once in 6,000 (which alone took a limit of
50 a second down to 23 in a quarter of an hour); two in a row, once in 36 million.

Each refusal on the beat is a moment the server was full, so what it let through between the
first and the last of them, over that time, is its rate (as `pipeline.pace.capacity` reads
between two moments, with no pause to wait out).
"""

from __future__ import annotations

from itertools import pairwise

from pipeline.pace.sendlog import SendLog

GAPS = 7  # gaps between refusals that make a beat
SPREAD = 0.3  # of the mean gap, that the gaps stay within
LEEWAY = 2  # requests the gaps may differ by however short they are (a loop late by a few ms)
APART = 2.0  # seconds between two windows of answers that share none (the finder's window)


class Rhythm:
    def __init__(self) -> None:
        self._seqs: list[int] = []
        self._many_at = -2 * APART  # when refusals were first seen many, in a window of answers

    def restart(self) -> None:
        self._seqs.clear()
        self._many_at = -2 * APART

    def lasting(self, now: float, many: bool) -> bool:
        """Refusals are `many` now: were they in a window of answers APART to twice that ago?"""
        if not many:
            return False
        since = now - self._many_at
        if since > 2 * APART:
            self._many_at = now  # the first window that says so
        return APART <= since <= 2 * APART

    def refused(self, seq: int, log: SendLog) -> float | None:
        """Request `seq` was refused, not in a run; returns the rate read over the steady beat
        it ends (whose refusals are forgotten then, so that the next is heard afresh), or None."""
        seqs = self._seqs
        seqs.append(seq)
        seqs.sort()  # answers do not always come back in send order
        del seqs[: -(GAPS + 1)]
        if len(seqs) <= GAPS or not log.kept(seqs[0]):
            return None
        gaps = [b - a for a, b in pairwise(seqs)]
        if max(gaps) - min(gaps) > max(LEEWAY, SPREAD * (seqs[-1] - seqs[0]) / GAPS):
            return None
        first, last = seqs[0], seqs[-1]
        seqs.clear()
        return log.accepted(first, last) / max(log.sent_at(last) - log.sent_at(first), 1e-3)
