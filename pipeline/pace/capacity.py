"""What a server lets through, read at the moments it was seen full.

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

from pipeline.pace.sendlog import SendLog

AGAIN_WITHIN, AGAIN_COUNT = 10.0, 60  # full again sooner, or fewer let through: one stretch
MAX_FULLS = 64  # moments kept, to read over the first and the last


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
