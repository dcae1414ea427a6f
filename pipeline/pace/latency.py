"""Rising latency, read as Little's law has it: the sign of a server that queues rather than
refuses. An LLM's latency also rises with longer answers or a busier provider, when cutting
the window would only cost throughput; so once a second the median latency, mean in flight
and answers a second are compared with their moving averages: more in flight that bought no
more answers, only twice the latency, twice in a row, was queueing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

LATENCY_SAMPLES = 16  # answers a latency reading needs, at least
LATENCY_RISE = 2.0  # queueing: latency this many times the usual...
CROWD_RISE = 1.5  # ...with this many times the usual in flight...
GAIN_MAX = 1.25  # ...for at most this many times the usual answers a second...
LATENCY_AFTER = 2  # ...in this many readings in a row
LATENCY_MEMORY = 0.1  # weight of each reading in the usual values (about ten seconds)


@dataclass(frozen=True, slots=True)
class Reading:
    latency: float  # median, seconds
    crowd: float  # mean in flight
    rate: float  # answers a second

    def toward(self, other: Reading, weight: float) -> Reading:
        return Reading(
            self.latency + weight * (other.latency - self.latency),
            self.crowd + weight * (other.crowd - self.crowd),
            self.rate + weight * (other.rate - self.rate),
        )


class LatencyWatch:
    """Each second's answers, read against the usual: latency, in flight, answers a second."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.samples: list[float] = []
        self.crowd = 0  # in flight at each answer, summed
        self.usual: Reading | None = None
        self._since = clock()
        self._high = 0

    def restart(self, at: float) -> None:
        """A new pace from `at`: readings start over (the usual values stay)."""
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
        usual = self.usual
        self.usual = reading if usual is None else usual.toward(reading, LATENCY_MEMORY)
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
