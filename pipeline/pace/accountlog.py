"""One process's part of its account's log, by the hundredth of the store's clock.

A shared pace tells the store what it sent and what was refused, and when a refusal said the
server has room again, by the hundredth a request left; and what got through by the hundredth
it was admitted: its answer's, less the least latency of the process's answers lately (what
the server takes). On busy cores a request leaves seconds after it is logged as sent (16
shards on two cores: up to 4 s), while its answer is seen within tens of milliseconds of the
server's admission: counted by send, readings came out at 0.4 to 0.8 of what got through.
It goes with whichever call comes next (`pipeline.pace.link`), with up to when the log of
admissions is whole; the account's limit is read from every process's log once the store
holds it whole (`pipeline.pace.reading`). While the store is away it is kept, up to LOG_MAX
hundredths.
"""

from __future__ import annotations

import math
from collections import deque

LOG_MAX = 2_000  # hundredths of the send log held while the store is away
FLOOR_SPAN = 5.0  # seconds over which the least latency of answers is taken (two spans: the last, this)
STALE = 600.0  # seconds after which a request unanswered is taken for one whose end is not told here
FAST = 0.25  # seconds: a server whose quickest answers take less is read by admission
REFUSALS = 16  # latencies of refusals kept


class AccountLog:
    def __init__(self) -> None:
        self.offset: float | None = None  # the store's clock on ours, minus ours
        self._log: dict[int, list[int]] = {}  # hundredth (the store's clock): [sent, refused, room, admitted]
        self.refusals = False  # the log holds a refusal not yet told
        self._out: dict[int, int] = {}  # hundredth (ours): requests sent then, not yet answered
        self._floor = (0.0, math.inf, math.inf)  # a span began then, its least latency, the last span's
        self._whole = -math.inf  # admissions are logged from here on (ours)
        self._refusals: deque[float] = deque(maxlen=REFUSALS)  # their latencies lately
        self._slow = False  # the last refusal came back with a request sent well before it out

    def sent(self, at: float) -> None:
        h = int(at * 100)
        self._out[h] = self._out.get(h, 0) + 1
        if self.offset is not None and len(self._log) < LOG_MAX:
            self._counts(at)[0] += 1

    def answered(self, sent_at: float) -> None:
        """The answer to a request sent at `sent_at` (ours) is in, a refusal or not."""
        h = int(sent_at * 100)
        if (n := self._out.get(h, 0)) > 1:
            self._out[h] = n - 1
        elif n:
            del self._out[h]

    def admitted(self, sent_at: float, now: float) -> None:
        """A request sent at `sent_at` was let through, its answer in `now` (both ours)."""
        self.answered(sent_at)
        began, least, last = self._floor
        if now - began >= FLOOR_SPAN:
            began, least, last = now, math.inf, least
        self._floor = began, min(least, max(now - sent_at, 0.0)), last
        if self.offset is not None and len(self._log) < LOG_MAX:
            self._counts(max(now - self.floor, self._whole))[3] += 1

    @property
    def floor(self) -> float:
        """The least latency of this process's answers lately: what the server takes (0: none yet)."""
        least = min(self._floor[1:])
        return least if least < math.inf else 0.0

    @property
    def late(self) -> float:
        """How long after the server admitted a request this process logs it: the least
        latency of its answers where it counts by admission, else none (counted by send)."""
        return self.floor if self.by_answer else 0.0

    @property
    def by_answer(self) -> bool:
        """Whether what got through is read by when it was admitted, as answers tell: when the
        server answers at once (its quickest answers within FAST), or about as fast as it
        refuses (busy cores: a request waits on its way there). Else by when it was sent, as
        before: a model answering in 2 to 30 s tells by its answer little of when it admitted
        a request (read by admission, a first reading came out at 22 and 2 where 60 got
        through, at 2 to 4 and 2 to 30 s), and its refusals come back at once. Nor when a
        refusal comes back with requests sent FAST or more before it still out (a server full
        refuses what comes after what it admitted: those take their time): one quick answer
        among answers of seconds (a short completion, in first) read 6 where 60 got through."""
        least, no = min(self._floor[1:]), self._refusals
        quick = least < FAST or (bool(no) and least <= 2 * sorted(no)[len(no) // 2] + 0.1)
        return quick and not self._slow

    def whole(self, now: float, within: float) -> float:
        """Up to when (the store's clock) this process's log is whole at `now`, while it has
        requests out (-1: none out; what it sends next is logged from its next call). Read by
        send, up to its oldest request sent in the last `within` seconds and unanswered: older,
        it is no refusal on its way (those take milliseconds), or one whose end is not told."""
        by_answer = self.by_answer
        out, stale = self._out, int((now - (STALE if by_answer else within)) * 100)
        while out and next(iter(out)) < stale:  # (in the order they were sent)
            del out[next(iter(out))]
        if not out or self.offset is None:
            return -1.0
        if not by_answer:
            return next(iter(out)) / 100 + self.offset
        self._whole = max(self._whole, now - self.floor)
        return self._whole + self.offset

    def refused(self, sent_at: float, resume: float, now: float) -> float | None:
        """A request sent at `sent_at` was refused, at `now`, until `resume` (our clock);
        returns when it was sent on the store's clock, or None when it is not logged."""
        self.answered(sent_at)
        self._refusals.append(now - sent_at)
        self._slow = bool(self._out) and next(iter(self._out)) < int((sent_at - FAST) * 100)
        if self.offset is None or len(self._log) >= LOG_MAX:
            return None
        counts = self._counts(sent_at)
        counts[1] += 1
        room = int((resume + self.offset) * 100)
        counts[2] = min(counts[2], room) if counts[2] else room
        self.refusals = True
        return sent_at + self.offset

    def _counts(self, at: float) -> list[int]:
        """Sent, refused, room (the earliest a refusal said the server has room again) and
        admitted, of the hundredth of the store's clock that `at` (ours) falls in."""
        assert self.offset is not None
        return self._log.setdefault(int((at + self.offset) * 100), [0, 0, 0, 0])

    def take(self) -> dict[int, list[int]]:
        """The log not yet told, to tell the store now."""
        log, self._log = self._log, {}
        self.refusals = False
        return log

    def untold(self, log: dict[int, list[int]]) -> None:
        """The store could not be told `log`: told when it is back."""
        for h, (n, m, w, a) in log.items():
            counts = self._log.setdefault(h, [0, 0, 0, 0])
            counts[0], counts[1], counts[3] = counts[0] + n, counts[1] + m, counts[3] + a
            counts[2] = min(counts[2], w) if counts[2] and w else counts[2] or w


def said(log: dict[int, list[int]]) -> str:
    """The log as the store's script takes it."""
    return " ".join(f"{h} {n} {m} {w} {a}" for h, (n, m, w, a) in log.items())
