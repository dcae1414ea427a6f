"""Limits that move: a rise nobody states is found within half a minute, a drop within two
seconds, and probing for a rise that did not happen costs a refusal or two a minute; on a
simulated server and a fake clock (`tests.simulated`), minutes of traffic in milliseconds."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pipeline.mock.limits import Bucket
from pipeline.pace.finder import HOLD, RateFinder
from pipeline.pace.pacer import Pacer
from pipeline.pace.probe import EVERY, SETTLE, K, Probe
from pipeline.pace.window import Window
from tests.simulated import Clock, Served, per_second, simulate


def finder(start: float = 1000.0) -> tuple[RateFinder, Clock]:
    clock = Clock(start)
    pacer = Pacer()
    return RateFinder(pacer, Window(200), clock=clock, stop=lambda stopped: None), clock


def each_second(served: Served, since: float, seconds: range) -> list[float]:
    """What got through in each second of `seconds` after `since`."""
    return [served.rate(since + s, since + s + 1) for s in seconds]


# The two slowest of 120 moments tried for the rise (every half second from 40 s to 70 s, at
# answers of 0.2 s and 1 s): right after a probe was refused, so the next waits SETTLE.
@pytest.mark.parametrize(("rises_at", "start", "latency"), [(52.5, 1000.52, 0.2), (69.5, 1000.39, 1.0)])
def test_a_limit_that_rises_is_used_within_half_a_minute(
    rises_at: float, start: float, latency: float
) -> None:
    f, clock = finder(start)
    limit = per_second(20)

    def rise() -> None:
        limit.requests = 50

    served = simulate(f, clock, [limit], seconds=rises_at + 60, latency=latency, changes=[(rises_at, rise)])
    rose = start + rises_at
    assert min(each_second(served, rose, range(30, 60))) >= 0.9 * 50
    assert served.share_refused <= 0.01


# The bench's schedule (50 a second, 20 from 20 s, 50 again from 40 s): a probe of the 50 refused
# within TAIL seconds before the fall was charged the fall's run of refusals (10 s of waiting
# each at 20 a second) and found the rise 31-39 s after it.
@pytest.mark.parametrize(("start", "rises_at"), [(1002.941, 40.0), (1001.903, 44.51)])
def test_a_rise_soon_after_a_fall_is_used_within_half_a_minute(start: float, rises_at: float) -> None:
    f, clock = finder(start)
    limit = per_second(50)

    def fall() -> None:
        limit.requests = 20

    def rise() -> None:
        limit.requests = 50

    changes = [(20.0, fall), (rises_at, rise)]
    served = simulate(f, clock, [limit], seconds=rises_at + 50, changes=changes)
    assert min(each_second(served, start + rises_at, range(30, 50))) >= 0.9 * 50
    assert served.share_refused <= 0.01


class Store:
    """A shared pace's store, as its finder sees it: the account's limit is read there."""

    reads_account = True

    def watch(self, then: Callable[[float, bool], None]) -> None:
        self.read = then

    def sent(self, at: float) -> None: ...
    def answered(self) -> None: ...
    def refused(self, sent_at: float, resume: float) -> None: ...


def test_a_shared_pace_that_falls_just_after_a_refused_probe_is_no_cost_of_it() -> None:
    clock = Clock(1000.0)
    pacer, store = Pacer(), Store()
    pacer.account = store  # type: ignore[assignment]
    f = RateFinder(pacer, Window(200), clock=clock, stop=lambda stopped: None)
    store.read(50.0, True)
    f.probe.refused(clock.now, 48.5)
    f.probe.charge(clock.now + 0.5, clock.now + 0.4)  # the fall's first refusals, in the tail
    f.probe.charge(clock.now + 0.6, clock.now + 0.5)
    clock.now += 1.0
    store.read(20.0, True)  # where the store saw the account full: the limit fell
    assert f.probe.after == pytest.approx(clock.now + SETTLE)


def test_a_shared_reading_of_nothing_keeps_the_window_growing_slowly() -> None:
    # Scattered refusals held the window's quick growth; then the store saw the account full
    # with nothing let through: the window is halved and grows slowly, the hold's end (the
    # new epoch's) does not give it quick growth back.
    clock = Clock(1000.0)
    pacer, store = Pacer(), Store()
    pacer.account = store  # type: ignore[assignment]
    window = Window(200)
    f = RateFinder(pacer, window, clock=clock, stop=lambda stopped: None)
    window.size = 40.0
    f.answers.hold(clock.now, 5, 20)
    assert window.threshold == 40.0  # held
    store.read(0.0, True)
    assert window.threshold == window.size == 20.0


def test_a_probe_refused_past_a_risen_limit_reads_the_servers_second() -> None:
    # The probe passes 50 a second in the middle of one of the server's seconds, which then
    # fills. The second before the refusal holds the end of the one before too (56 let
    # through); the server's own, up to when it says it has room again, holds its 50.
    f, clock = finder()
    limit = per_second(20)
    found: list[float] = []
    pace = f.pacer.set_request_rate

    def rise() -> None:
        limit.requests = 50

    def paced(rate: float | None) -> None:
        found.append(f.limit or 0.0)
        pace(rate)

    f.pacer.set_request_rate = paced  # type: ignore[method-assign]
    served = simulate(f, clock, [limit], seconds=100, changes=[(60, rise)])
    assert next(read for read in found if read > 21) == 50
    assert served.refusals(1060, 1100) <= 3


@pytest.mark.parametrize(("limit", "most"), [(50, 5 * 4), (10, 10 * 60 * 4 // EVERY)])
def test_probing_a_steady_limit_costs_a_refusal_or_two_a_minute(limit: int, most: int) -> None:
    # Four minutes after the first: at most 5 refusals a minute at 3,000 a minute, and at
    # 600 a minute no more than one in EVERY requests.
    f, clock = finder()
    served = simulate(f, clock, [per_second(limit)], seconds=300)
    assert served.refusals(1060, 1300) <= most
    assert served.rate(1060, 1300) >= 0.96 * limit


def test_a_drop_after_a_rise_is_followed_within_two_seconds() -> None:
    f, clock = finder()
    limit = per_second(20)

    def rise() -> None:
        limit.requests = 50

    def drop() -> None:
        limit.requests = 20

    served = simulate(f, clock, [limit], seconds=115, changes=[(60, rise), (100, drop)])
    assert all(18 <= rate <= 20 for rate in each_second(served, 1100, range(2, 15)))


def test_a_limit_read_again_then_full_is_read_from_one_moment() -> None:
    # A limit a probe raised is a guess: the first refusal at its pace reads it again, with
    # no pause. When that refusal is the first of a run (the limit fell), the run is the same
    # moment the server was full, not a second one with nothing let through between them.
    f, clock = finder()
    limit = per_second(50)
    simulate(f, clock, [limit], seconds=20)
    f.capacity.sure = False

    def drop() -> None:
        limit.requests = 20

    served = simulate(f, clock, [limit], seconds=15, changes=[(3, drop)])
    assert all(18 <= rate <= 20 for rate in each_second(served, 1023, range(2, 12)))


def test_a_buckets_savings_passed_for_a_rise_cost_little() -> None:
    # A minute's quota saved, refilled at 10 a second: a probe spends what the pace under the
    # refill saved and reads it as a rise, until the next refusals read the limit again.
    f, clock = finder()
    served = simulate(f, clock, [Bucket(capacity=600, rate=10)], seconds=300)
    assert served.refusals(1060, 1300) <= 2400 * 2 // EVERY
    assert served.rate(1060, 1300) >= 0.96 * 10


def test_the_probe_lingers_at_the_limit_then_climbs() -> None:
    probe = Probe(HOLD)
    probe.settle(0.0, None)
    assert probe.next(SETTLE - 0.5, 100.0) is None  # settling first
    curve = [probe.next(SETTLE + t, 100.0) or 0.0 for t in range(20)]
    assert curve[0] == pytest.approx(100 * HOLD)
    assert curve[int(K)] == pytest.approx(100.0)
    assert curve[int(K) + 2] <= 101.0  # crossing it slowly...
    assert curve[int(K) + 12] >= 250.0  # ...then climbing


def test_a_refused_probe_waits_longer_the_more_it_cost() -> None:
    probe = Probe(HOLD)
    probe.settle(0.0, None)
    probe.next(SETTLE, 10.0)
    probe.refused(SETTLE + 5, 9.7)
    assert probe.after == pytest.approx(SETTLE + 5 + EVERY / 9.7)  # EVERY requests at 9.7 a second
    probe.charge(SETTLE + 5.1, SETTLE + 4.98)  # in flight when it was refused: the same overshoot
    assert probe.after == pytest.approx(SETTLE + 5 + EVERY / 9.7)
    probe.charge(SETTLE + 6, SETTLE + 5.9)  # the rest of the server's second, refused too
    assert probe.after == pytest.approx(SETTLE + 5 + 2 * EVERY / 9.7)
    probe.charge(SETTLE + 60, SETTLE + 59.9)  # later refusals are not the probe's
    assert probe.after == pytest.approx(SETTLE + 5 + 2 * EVERY / 9.7)


def test_a_limit_that_falls_just_after_a_refused_probe_is_not_its_cost() -> None:
    # The fall's run of refusals comes within the probe's tail; the pace read from it is the
    # fall's, and the next probe waits SETTLE from it, as after any new pace.
    probe = Probe(HOLD)
    probe.settle(0.0, None)
    probe.next(SETTLE, 50.0)
    probe.refused(SETTLE + 5, 48.5)
    for t in (SETTLE + 5.9, SETTLE + 5.92, SETTLE + 5.94, SETTLE + 5.96):
        probe.charge(t + 0.005, t)
    probe.settle(SETTLE + 6, 19.4)
    assert probe.after == pytest.approx(SETTLE + 6 + SETTLE)
