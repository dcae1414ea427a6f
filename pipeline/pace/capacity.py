"""What a server lets through, read at the moments it was seen full: after a run of refusals
(`Capacity`), or on the steady beat of a pace's own overshoot (`Rhythm`).

A moment the server is full (a run of refusals, or refusals at a pace it should hold) is a
`Full`: when the first refused request left, and when the server said it had room again. At
the first, what it let through in the second before is its limit (servers count per second at
least; a reading spanning two of its windows comes out high, and the next moment corrects it).
At every later one, the rate is read from the first moment kept: the requests not refused
from when it had room to when it was full again, over that time. Both ends are moments it was
full, so it let through exactly those, whatever it counts: fixed windows or a bucket refilled
continuously. Moments are kept while full again within AGAIN_WITHIN seconds of having room, or
with fewer than AGAIN_COUNT let through between (a slow limit's minute); after a longer
stretch with room, the next starts afresh.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import pairwise

from pipeline.pace.sendlog import SendLog

AGAIN_WITHIN, AGAIN_COUNT = 10.0, 60  # full again sooner, or fewer let through: one stretch
MAX_FULLS = 64  # moments kept, to read over the first and the last
GAPS = 7  # gaps between refusals that make a beat
SPREAD = 0.3  # of the mean gap, that the gaps stay within
LEEWAY = 2  # requests the gaps may differ by however short they are (a loop late by a few ms)
APART = 2.0  # seconds between two windows of answers that share none (the finder's window)


@dataclass(frozen=True, slots=True)
class Full:
    at: float  # when the first refused request of the run left
    seq: int  # that request
    resume: float  # when the server said it would take requests again
    after: int  # the first request sent after that


class Capacity:
    def __init__(self, log: SendLog) -> None:
        self.log = log
        self.sure = False  # the last reading spanned a second at least
        self._fulls: deque[Full] = deque()
        self._counted: tuple[float, int, float] | None = None  # the last reading: from, before, over

    def read(self, seq: int, resume: float) -> float:
        """Requests a second the server lets through, read at the moment it refused request
        `seq`, to have room again at `resume`."""
        fulls, full = self._fulls, Full(self.log.sent_at(seq), seq, resume, self.log.next)
        if fulls and self.log.accepted(fulls[-1].after, full.seq) == 0:
            # Nothing got through since the last moment: the server never had room when it
            # said (or, refused at the pace a limit allows, when the reading assumed). One
            # moment, with room when this one says: a reading from the first would count
            # the time it had none.
            last = fulls.pop()
            fulls.append(Full(last.at, last.seq, full.resume, full.after))
            if len(fulls) == 1:
                return 0.0
            full = fulls.pop()
        if (
            fulls
            and full.at - fulls[-1].resume > AGAIN_WITHIN
            and self.log.accepted(fulls[-1].after, full.seq) > AGAIN_COUNT
        ):
            fulls.clear()  # the server had room for a while since: a new stretch
        while fulls and (fulls[0].after < self.log.oldest or len(fulls) >= MAX_FULLS):
            fulls.popleft()
        fulls.append(full)
        if len(fulls) == 1:
            self.sure = True
            first = self.log.since(full.at - 1.0, full.seq)
            wrapped = first == self.log.oldest > 0  # the send log holds less than a second
            start = self.log.sent_at(first) if wrapped else full.at - 1.0
            span = max(full.at - start, 1e-3) if wrapped else 1.0
            self._counted = (start, full.seq, span)
            return self.log.accepted(first, full.seq) / span
        since = fulls[0]
        count = self.log.accepted(since.after, full.seq)
        span = max(full.resume - since.resume, 1e-3)
        self.sure = span >= 1.0
        self._counted = (self.log.sent_at(since.after), full.seq, span)
        return count / span

    def uncount(self, seq: int) -> float:
        """A refusal back after the last reading, for a request it counted as let through
        (answers come back out of send order): the requests a second to take off it, or 0."""
        counted = self._counted
        if counted is None:
            return 0.0
        since, before, span = counted
        if seq < before and self.log.sent_at(seq) >= since and not self.log.refused(seq):
            return 1 / span
        return 0.0


class Rhythm:
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
    first and the last of them, over that time, is its rate (as `Capacity` reads
    between two moments, with no pause to wait out)."""

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
