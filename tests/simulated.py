"""A server with a limit, simulated on a fake clock, to drive a `RateFinder` through minutes of
traffic in milliseconds: requests leave at the finder's pace (or as fast as they are offered
when it has none) and never while it pauses the pool; the limit decides each on arrival, as
the mock's limits do; a refusal comes back in `refusal` seconds, an answer in `latency`; and
the limit may change at given moments (a tier upgrade, an upstream recovering)."""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pipeline.mock.limits import Limit, Refusal
from pipeline.mock.limits import Window as PerWindow
from pipeline.pace.finder import RateFinder


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def per_second(limit: float) -> PerWindow:
    return PerWindow(length=1.0, requests=limit, tokens=None)


class WholeSeconds:
    """A limit whose refusals say their wait in whole seconds, rounded up (a `Retry-After`
    header, as Anthropic's)."""

    def __init__(self, limit: Limit) -> None:
        self.limit = limit

    def admit(self, now: float, tokens: float) -> Refusal | None:
        refusal = self.limit.admit(now, tokens)
        return None if refusal is None else Refusal(float(math.ceil(refusal.wait)), refusal.message)


@dataclass
class Served:
    accepted: list[float] = field(default_factory=list)  # when each was let through
    refused: list[float] = field(default_factory=list)  # when each refused one left

    def rate(self, since: float, until: float) -> float:
        return sum(1 for t in self.accepted if since <= t < until) / (until - since)

    def refusals(self, since: float, until: float) -> int:
        return sum(1 for t in self.refused if since <= t < until)

    @property
    def share_refused(self) -> float:
        return len(self.refused) / max(len(self.refused) + len(self.accepted), 1)


def simulate(
    f: RateFinder,
    clock: Clock,
    limits: Sequence[Limit],
    *,
    seconds: float,
    offered: float = 500.0,
    latency: float = 0.2,
    refusal: float = 0.005,
    changes: Sequence[tuple[float, Callable[[], None]]] = (),
    served: Served | None = None,
) -> Served:
    """Offer `offered` requests a second for `seconds`; `changes` are (seconds from now, what
    changes then) in order."""
    out = served if served is not None else Served()
    start = clock.now
    end = start + seconds
    pending = [(start + at, change) for at, change in changes]
    answers: list[tuple[float, int, bool, float | None, str]] = []  # due, ticket, refused, wait, message
    resume = clock.now
    pause = f.pacer.pause

    def paused(seconds: float) -> None:
        nonlocal resume
        resume = max(resume, clock.now + seconds)

    f.pacer.pause = paused  # type: ignore[method-assign]
    last = clock.now
    try:
        while True:
            rate = min(offered, f.pacer.request_rate or offered)
            at = max(last + 1 / rate, resume)
            if answers and answers[0][0] <= at:
                due, ticket, refused, wait, message = heapq.heappop(answers)
                clock.now = max(clock.now, due)
                if refused:
                    f.pushback(ticket, wait, message)
                else:
                    f.success(ticket, latency)
                continue
            if at >= end:
                clock.now = end
                return out
            clock.now = last = at
            while pending and pending[0][0] <= at:
                pending.pop(0)[1]()
            if rate < offered:
                f.pacer.waits += 1  # the pace is what holds requests back: the finder may probe
            ticket = f.sent()
            said = next((r for limit in limits if (r := limit.admit(at, 0.0)) is not None), None)
            if said is None:
                out.accepted.append(at)
                heapq.heappush(answers, (at + latency, ticket, False, None, ""))
            else:
                out.refused.append(at)
                heapq.heappush(answers, (at + refusal, ticket, True, said.wait, said.message))
    finally:
        f.pacer.pause = pause  # type: ignore[method-assign]
