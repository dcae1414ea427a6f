"""What the answers at the current pace say to the in-flight window (`window`: the account's alone).

Until a limit is found, requests are not paced: one check each, no timer. The last two
seconds' answers tell how common refusals are at the pace in force; more than scattered ones
hold the window's quick growth until a trend shows. Answers of about one length, longer at
more in flight, give back the queue at once (`_queued`). Rising latency at more in flight
gives up a quarter of the window (`LatencyWatch`, after Little's law): a server that queues
rather than refuses. An LLM's latency also rises with longer answers or a busier provider,
where a cut only costs throughput; so once a second the median latency, mean in flight and
answers a second are held against their moving averages: more in flight that bought no more
answers, only twice the latency, twice in a row, was queueing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

from pipeline.pace.window import Window

BUCKET = 0.1  # seconds per bucket of the sliding window of answers
BUCKETS = 20  # two seconds of answers
HOLD_SHARE, HOLD_MIN = 0.05, 3  # more than scattered: stop growing the window quickly...
HOLD_FOR = BUCKET * BUCKETS  # ...for as long as it takes a trend to show, then grow again
LATENCY_KEEP = 0.75  # of the window, at a rise in latency that bought nothing
BLOCK, TIGHT = 8, 2.0  # answers a queue reading takes (HyStart++'s samples a round, RFC 9406)...
# ...if the longest took at most TIGHT times the quickest: they take about the same time
RISE_MIN, RISE_MAX = 0.004, 0.016  # HyStart++'s clamps of a rise in latency that is a queue
LATENCY_SAMPLES = 16  # answers a latency reading needs, at least
LATENCY_RISE = 2.0  # queueing: latency this many times the usual...
CROWD_RISE = 1.5  # ...with this many times the usual in flight...
GAIN_MAX = 1.25  # ...for at most this many times the usual answers a second...
LATENCY_AFTER = 2  # ...in this many readings in a row
LATENCY_MEMORY = 0.1  # weight of each reading in the usual values (about ten seconds)


class Reading(NamedTuple):
    latency: float  # median, seconds
    crowd: float  # mean in flight
    rate: float  # answers a second


class LatencyWatch:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.samples: list[float] = []
        self.crowd = 0  # in flight at each answer, summed
        self.usual: Reading | None = None
        self._since = clock()
        self._high = 0

    def restart(self, at: float) -> None:
        """A new pace from `at`: readings start over, the usual values stay."""
        self.samples.clear()
        self.crowd = 0
        self._since = at
        self._high = 0

    def add(self, latency: float, in_flight: int) -> None:
        self.samples.append(latency)
        self.crowd += in_flight

    def queueing(self, now: float) -> bool:
        """Once a second: did more in flight buy only latency, for long enough?"""
        if now < self._since:  # answers to what was sent before a pause that is not over
            self.restart(self._since)
            return False
        n = len(self.samples)
        if n < LATENCY_SAMPLES:
            return False  # too few to say: keep them for the next reading
        median = sorted(self.samples)[n // 2]
        reading = Reading(median, self.crowd / n, n / max(now - self._since, 1e-3))
        self.samples.clear()
        self.crowd = 0
        self._since = now
        usual, self.usual = self.usual, reading
        if usual is not None:  # moving averages
            self.usual = Reading(*(u + LATENCY_MEMORY * (r - u) for u, r in zip(usual, reading, strict=True)))
        if usual is None or not (
            reading.latency > LATENCY_RISE * usual.latency
            and reading.crowd > CROWD_RISE * usual.crowd
            and reading.rate < GAIN_MAX * usual.rate
        ):
            self._high = 0
            return False
        self._high += 1
        if self._high < LATENCY_AFTER:
            return False
        self._high = 0
        return True


class Answers:
    def __init__(self, window: Window | None, clock: Callable[[], float]) -> None:
        self.window = window
        self.clock = clock
        self.latency = LatencyWatch(clock)
        self.latency_cuts = 0
        self._back = [0] * BUCKETS
        self._all = [0] * BUCKETS
        self._bucket = 0
        self._held: tuple[float, float] | None = None  # since when, and the threshold before
        self._hold_spent = False  # a hold lapsed in this epoch: the pushback is scattered
        # Refused and answered since the limit was read: the sliding window holds too few
        # answers at a slow pace (a model's 2 a second) to tell a limit read too high, and
        # the probes' steps back (each a new epoch) come sooner than enough of them.
        self.tally = [0, 0]
        self._next_step = 0.0
        self._floor, self._crowd = math.inf, 0  # the quickest answer's latency, and in flight then
        self._block: list[float] = []
        self._cut_until = 0.0

    def _slot(self, now: float) -> int:
        bucket = int(now / BUCKET)
        if bucket != self._bucket:
            for b in range(max(self._bucket + 1, bucket - BUCKETS + 1), bucket + 1):
                i = b % BUCKETS
                self._back[i] = self._all[i] = 0
            self._bucket = bucket
        return bucket % BUCKETS

    def restart(self, now: float) -> None:
        """A new pace: judge it on the answers to what is sent at it, not before."""
        # A hold belongs to the pace it was judged at: end it, and let the new pace have its own.
        self._end_hold()
        self._hold_spent = False
        self.latency.restart(now)  # answers from before the change say nothing of it
        for j in range(BUCKETS):
            self._back[j] = self._all[j] = 0

    def grow(self, latency: float | None) -> None:
        window = self.window
        if window is None:  # a model's scope: only the account's window is entered
            return
        window.grow(latency)
        if latency is not None:
            self.latency.add(latency, window.in_flight)
            self._block.append(latency)
            if len(self._block) >= BLOCK:
                self._queued(window)

    def _queued(self, window: Window) -> None:
        """Answers that take about the same time, all longer than the quickest by an eighth
        (4 to 16 ms: HyStart++'s test) at more in flight, waited in a queue: the server's, or
        this process's loop reading them late (a slower server at the same in flight is not
        one). A refusal waits there as long, and what is sent meanwhile is refused with it:
        the window gives back what the queue holds (Little's law: as many answers a second
        at the quickest latency), and stops growing quickly."""
        low, high = min(self._block), max(self._block)
        self._block.clear()
        floor, now = self._floor, self.clock()
        if low < floor:
            self._floor, self._crowd = low, window.in_flight
        if (
            high > TIGHT * low
            or floor < RISE_MIN  # a server on this machine answering at once: the queue is all ours
            or low <= floor + min(max(floor / 8, RISE_MIN), RISE_MAX)
            or window.in_flight < CROWD_RISE * self._crowd
            or now < self._cut_until
        ):
            return
        self._cut_until = now + low  # what was sent since the cut is back by then
        size = max(window.in_flight * floor / low * 1.125, window.start)
        if size < window.size:
            window.cut(size)
            self.drop_hold()

    def ok(self, now: float) -> None:
        self._all[self._slot(now)] += 1
        self.tally[1] += 1

    def other(self, now: float) -> None:
        """An answer that says nothing of the rate."""
        self._all[self._slot(now)] += 1

    def refused(self, now: float) -> tuple[int, int]:
        """A refusal at the current pace; returns the refusals and answers before it."""
        i = self._slot(now)
        back, total = sum(self._back), sum(self._all)
        self._back[i] += 1
        self._all[i] += 1
        self.tally[0] += 1
        self.tally[1] += 1
        return back, total

    def step(self, now: float) -> bool:
        """At most once a second: a hold may lapse, latency may cut the window. Returns
        whether it stepped (and the finder's probe may step too)."""
        if now < self._next_step:
            return False
        self._next_step = now + 1.0
        self._lapse_hold(now)
        self._read_latency(now)
        return True

    def hold(self, now: float, back: int, total: int) -> None:
        """Pushback more than scattered: stop the window's quick growth until a trend shows.
        If none does within the sliding window, it was scattered after all (an aggregator's
        upstreams): quick growth resumes for the rest of the epoch, or a few 429s early in a
        run would leave the window small."""
        if back < HOLD_MIN or back < HOLD_SHARE * total:
            return
        window = self.window
        if window is None:
            return
        if self._held is None and not self._hold_spent and window.threshold > window.size:
            self._held = (now, window.threshold)
            window.hold()

    def drop_hold(self) -> None:
        """The window was cut for a reason of its own: a lapsing hold must not undo it."""
        self._held = None

    def _lapse_hold(self, now: float) -> None:
        if self._held is not None and now - self._held[0] >= HOLD_FOR:
            self._end_hold()
            self._hold_spent = True

    def _end_hold(self) -> None:
        if self._held is not None and self.window is not None:
            self.window.threshold = max(self.window.threshold, self._held[1])
            self._held = None

    def _read_latency(self, now: float) -> None:
        window = self.window
        # Only while the window holds requests back is the queue ours to shorten.
        if window is not None and self.latency.queueing(now) and window.in_flight >= window.size / 2:
            self.drop_hold()
            before = window.size
            window.shrink(LATENCY_KEEP)
            if window.size < before:
                self.latency_cuts += 1
