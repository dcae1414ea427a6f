"""A pace held just above a limit is refused at a steady beat, which reads the limit again;
scattered refusals come at random, and never do; on a simulated server and a fake clock
(`tests.simulated`)."""

from __future__ import annotations

import random

import pytest

from pipeline.mock.limits import Bucket, Refusal
from pipeline.pace.capacity import GAPS, Rhythm
from pipeline.pace.finder import RateFinder
from pipeline.pace.pacer import Pacer
from pipeline.pace.sendlog import SendLog
from pipeline.pace.window import Window
from tests.simulated import Clock, WholeSeconds, per_second, simulate


class Unsaid:
    """A limit whose refusals say no wait."""

    def __init__(self, limit: Bucket) -> None:
        self.limit = limit

    def admit(self, now: float, tokens: float) -> Refusal | None:
        refusal = self.limit.admit(now, tokens)
        return None if refusal is None else Refusal(None, refusal.message)  # type: ignore[arg-type]


@pytest.mark.parametrize("said", ["exact", "seconds", "none"])
def test_a_buckets_savings_read_as_its_rate_are_read_again(said: str) -> None:
    # A bucket holding one second of 50 a second: the first moment it is full counts its 50
    # saved with the refill, and reads 55. The pace just above 50 is refused once in 17
    # requests, too few to make a run or pass 15 % of answers: 6 % of requests, for good.
    # Read again, what is left is the probe's (a refusal or two a minute, tests/test_probe.py).
    clock = Clock()
    f = RateFinder(Pacer(), Window(256), clock=clock, stop=lambda stopped: None)
    bucket = Bucket(capacity=50, rate=50)
    limit = {"exact": bucket, "seconds": WholeSeconds(bucket), "none": Unsaid(bucket)}[said]
    served = simulate(f, clock, [limit], seconds=60, latency=0.05)
    since = 1005.0  # past the first moment it was full and the beat that reads it again
    refused = served.refusals(since, 1060)
    assert refused / (refused + served.rate(since, 1060) * 55) <= 0.01
    assert served.rate(since, 1060) >= 0.95 * 50


def test_scattered_refusals_make_no_beat() -> None:
    # One request in twenty refused at random (an aggregator's upstreams on a bad day), 20,000
    # of them: their gaps never line up as a pace's own refusals do.
    draw = random.Random(21)
    rhythm, log = Rhythm(), SendLog()
    beats = 0
    for i in range(400_000):
        seq = log.send(i / 50)
        if draw.random() < 0.05:
            log.refuse(seq)
            beats += rhythm.refused(seq, log) is not None
    assert beats == 0


def test_a_steady_beat_reads_what_got_through_between_its_refusals() -> None:
    # 51 a second, refused one in 17 (a bucket of 48 a second), each refusal a request
    # early or late (a client's loop a few milliseconds late): gaps of 15 to 19.
    rhythm, log = Rhythm(), SendLog()
    heard = []
    late = [0, 1, -1, 1, 0, -1, 1, 0]
    beat = {17 * (k + 1) + late[k] for k in range(GAPS + 1)}
    for i in range(GAPS * 17 + 25):
        seq = log.send(i / 51)
        if i in beat:
            log.refuse(seq)
            heard.append(rhythm.refused(seq, log))
    assert heard[:GAPS] == [None] * GAPS
    assert heard[GAPS] == pytest.approx(48, rel=0.02)


class Scattered:
    """Refuses requests at random, `share` of them (an aggregator's upstreams)."""

    def __init__(self, share: float, seed: int) -> None:
        self.share = share
        self.draw = random.Random(seed)

    def admit(self, now: float, tokens: float) -> Refusal | None:
        return Refusal(1.0, "upstream busy") if self.draw.random() < self.share else None


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_scattered_refusals_at_a_known_limit_never_lower_it(seed: int) -> None:
    # 5 % of requests refused at random on top of 50 a second: a 2 s window of answers holds
    # 15 % of refusals now and then by chance (which read the limit again, lower each time:
    # 50 a second went down to 23 in a quarter of an hour); a pace above its limit is refused
    # that often window after window.
    clock = Clock()
    f = RateFinder(Pacer(), Window(256), clock=clock, stop=lambda stopped: None)
    limits = [per_second(50), Scattered(0.05, seed)]
    simulate(f, clock, limits, seconds=5)
    found = f.limit
    assert found is not None
    served = simulate(f, clock, limits, seconds=900)
    assert f.limit >= found
    assert served.rate(1005, 1905) >= 0.9 * found
