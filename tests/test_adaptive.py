"""Finding an unstated rate limit from the refusals, on a fake clock, against the mock's own
limit models; the in-flight window; and a run against the mock that finds one."""

from __future__ import annotations

import asyncio
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

import pipeline
from pipeline.errors import RunStopped
from pipeline.mock.limits import Bucket, Limit, Quota, Refusal
from pipeline.mock.limits import Window as PerWindow
from pipeline.pace.finder import HOLD, SETTLE, RateFinder
from pipeline.pace.gate import Gate
from pipeline.pace.pacer import Pacer
from pipeline.pace.scopes import Scopes
from pipeline.pace.window import Window
from pipeline.send.status import http_error
from pipeline.send.waits import parse_duration as parse_reset
from tests.conftest import bodies, read_jsonl
from tests.simulated import Clock as SimClock
from tests.simulated import simulate


class Clock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def finder(
    *,
    ceiling: float | None = None,
    size: int = 256,
    start: float = 1000.0,
    give_up: float = 600.0,
    window_start: int = 16,
) -> tuple[RateFinder, Pacer, Window, Clock]:
    clock = Clock(start)
    pacer = Pacer(request_rate=ceiling)
    window = Window(size, start=window_start)
    f = RateFinder(pacer, window, ceiling=ceiling, clock=clock, give_up=give_up, stop=stopped.append)
    return f, pacer, window, clock


stopped: list[RunStopped] = []


@pytest.fixture(autouse=True)
def _no_stops_left_over() -> None:
    stopped.clear()


def per_second(limit: float) -> PerWindow:
    return PerWindow(length=1.0, requests=limit, tokens=None)


class Scattered:
    """An aggregator's upstreams: a share of requests refused at random, whatever the rate."""

    def __init__(self, share: float, *, seed: int = 0) -> None:
        self.share = share
        self.rng = random.Random(seed)

    def admit(self, now: float, tokens: float) -> Refusal | None:
        return Refusal(1.0, "upstream busy") if self.rng.random() < self.share else None


class Never:
    def admit(self, now: float, tokens: float) -> Refusal | None:
        return Refusal(1.0, "Rate limit reached")


@dataclass
class Served:
    accepted: list[float] = field(default_factory=list)  # when each was let through
    refused: int = 0

    def rate(self, since: float, until: float) -> float:
        return sum(1 for t in self.accepted if since <= t < until) / (until - since)

    @property
    def share_refused(self) -> float:
        return self.refused / max(self.refused + len(self.accepted), 1)


def serve(f: RateFinder, clock: Clock, limits: list[Limit], *, seconds: float, offered: float) -> Served:
    """Offer `offered` requests a second for `seconds`, at the finder's pace when it has one
    and never while it pauses the pool; each limit decides on arrival, as the mock's do, and
    every answer comes straight back."""
    out = Served()
    end = clock.now + seconds
    resume = 0.0
    pauses: list[float] = []
    pause = f.pacer.pause
    f.pacer.pause = lambda seconds: (pauses.append(seconds), pause(seconds))  # type: ignore[method-assign]
    try:
        while True:
            rate = min(offered, f.pacer.request_rate or offered)
            if rate < offered:
                f.pacer.waits += 1  # the pace is what holds requests back: the finder may probe
            clock.now = max(clock.now + 1 / rate, resume)
            if clock.now >= end:
                return out
            ticket = f.sent()
            refusal = next((r for limit in limits if (r := limit.admit(clock.now, 0.0)) is not None), None)
            if refusal is None:
                out.accepted.append(clock.now)
                f.success(ticket)
                continue
            out.refused += 1
            f.pushback(ticket, refusal.wait, refusal.message)
            if pauses:  # the pool waits, on the fake clock
                resume = max(resume, clock.now + max(pauses))
                pauses.clear()
    finally:
        del f.pacer.pause


# -- a limit counted per second ----------------------------------------------------------------


async def test_a_limit_counted_per_second_is_found_at_once_with_few_refusals() -> None:
    f, pacer, window, clock = finder()
    served = serve(f, clock, [per_second(50)], seconds=30, offered=500)
    assert f.limit == pytest.approx(50, rel=0.03)
    assert pacer.request_rate == pytest.approx(50 * HOLD, rel=0.03)
    assert served.refused <= 10  # one run of four, and the odd probe past the limit
    assert served.rate(clock.now - 25, clock.now) >= 0.95 * 50
    assert window.size == 256  # the pace bounds the rate now, not the window


async def test_a_first_reading_that_spans_two_windows_is_corrected_by_the_next() -> None:
    # Started late in one of the server's seconds: the first reading counts the end of that
    # second and the whole next one, more than the server allows in any one.
    f, _, _, clock = finder(start=1000.9)
    served = serve(f, clock, [per_second(50)], seconds=10, offered=80)
    assert f.cuts >= 2
    assert f.limit == pytest.approx(50, rel=0.03)
    assert served.refused <= 12


async def test_a_refusal_that_comes_back_late_is_taken_out_of_the_reading() -> None:
    f, pacer, _, clock = finder()
    tickets = []
    for _ in range(60):
        clock.now += 0.01
        tickets.append(f.sent())
    for ticket in tickets[:49]:
        f.success(ticket)
    late = tickets[49]  # refused too, but its answer is still on its way...
    for ticket in tickets[50:]:
        f.pushback(ticket, 0.4)  # ...when the others' say the server is full
    assert f.limit == 50  # so it was counted as let through
    f.pushback(late, 0.4)
    assert f.limit == 49
    assert pacer.request_rate == pytest.approx(49 * HOLD)


async def test_requests_sent_at_the_same_instant_a_second_before_the_first_refused_all_count() -> None:
    # Requests that share a time (a burst within one tick of a coarse clock): when it is the
    # start of the second read, every one of them is in the second the server counted.
    f, _, _, clock = finder()
    for ticket in [f.sent() for _ in range(20)]:
        f.success(ticket)
    clock.now += 1.0
    for ticket in [f.sent() for _ in range(4)]:
        f.pushback(ticket, 1.0)
    assert f.limit == 20


async def test_a_bucket_with_a_minutes_burst_is_read_from_its_refill() -> None:
    # A minute's quota at once, then one every 0.1 s: the first reading sees the burst, the
    # next ones what the refill lets through.
    f, _, _, clock = finder()
    bucket = Bucket(capacity=600, rate=10)
    early = serve(f, clock, [bucket], seconds=2, offered=2000)
    assert f.limit == pytest.approx(10, rel=0.05)
    assert early.refused <= 15
    # Then probing, which the bucket fools for a while with what it saved at 97 % of its
    # refill, and a reading again at the first refusal: a few refusals, the limit kept.
    later = serve(f, clock, [bucket], seconds=58, offered=2000)
    assert later.share_refused <= 0.02
    assert later.rate(clock.now - 50, clock.now) >= 0.96 * 10


async def test_a_limit_per_minute_is_paced_over_the_minute() -> None:
    f, _, _, clock = finder(start=1020.0)
    served = serve(f, clock, [PerWindow(length=60.0, requests=600, tokens=None)], seconds=150, offered=100)
    assert f.limit is not None
    assert f.limit == pytest.approx(10, rel=0.2)
    assert served.refused <= 40


async def test_a_server_that_lets_nothing_through_pauses_without_inventing_a_limit() -> None:
    # A slow model behind fast refusals: 429s, and no answer yet.
    f, pacer, _, clock = finder()
    for _ in range(20):
        clock.now += 0.005
        f.pushback(f.sent(), 1.0)
    assert f.cuts >= 1
    assert pacer.request_rate is None  # no limit read from nothing: no crawl at 0.5 a second
    assert pacer.paused_until > 0


async def test_answers_to_requests_sent_before_a_change_of_pace_change_nothing() -> None:
    f, pacer, _, clock = finder()
    early = [f.sent() for _ in range(100)]  # in flight when the server fills up
    serve(f, clock, [per_second(50)], seconds=2, offered=500)
    rate, cuts = pacer.request_rate, f.cuts
    for ticket in early:  # they come back refused, late
        clock.now += 0.001
        f.pushback(ticket, 1.0)
    assert (pacer.request_rate, f.cuts) == (rate, cuts)


# -- refusals that are not a limit ---------------------------------------------------------------


async def test_scattered_429s_never_start_pacing() -> None:
    f, pacer, window, clock = finder()
    served = serve(f, clock, [Scattered(0.03)], seconds=30, offered=500)
    assert served.refused > 300
    assert pacer.request_rate is None
    assert f.cuts == 0
    assert pacer.paused_until == 0.0
    assert window.size == 256  # the window grew to the ceiling all the same


async def test_scattered_429s_early_in_a_run_do_not_leave_the_window_small() -> None:
    # 10 % of answers refused, from the start, as an aggregator's upstreams may: enough to
    # stop the window's quick growth for a while, never a run that cuts anything.
    f, pacer, window, clock = finder()
    serve(f, clock, [Scattered(0.1)], seconds=0.2, offered=500)
    held = window.size
    assert held < 256
    serve(f, clock, [Scattered(0.1, seed=1)], seconds=4, offered=500)
    assert window.size == 256  # growing by one a round trip from `held` would take minutes
    assert pacer.request_rate is None
    assert f.cuts == 0


@pytest.mark.parametrize("limit", [100, 10])
async def test_scattered_429s_at_a_known_limit_never_ratchet_it_down(limit: int) -> None:
    # At 10 a second, a two-second window holds 20 answers: three scattered refusals among
    # them are 15 % by chance. Ten minutes of it, probing all along.
    f, _, _, clock = finder()
    serve(f, clock, [per_second(limit)], seconds=10, offered=10 * limit)
    assert f.limit == pytest.approx(limit, rel=0.03)
    served = serve(f, clock, [per_second(limit), Scattered(0.03)], seconds=600, offered=10 * limit)
    assert f.limit >= limit * 0.97
    assert served.rate(clock.now - 500, clock.now) >= limit * HOLD * 0.95


async def test_overshoot_above_a_known_limit_steps_back_without_a_pause() -> None:
    f, pacer, _, clock = finder()
    serve(f, clock, [per_second(50)], seconds=5, offered=500)
    assert f.limit is not None
    paused = pacer.paused_until
    pacer.set_request_rate(f.limit * 1.05)  # probed past it
    serve(f, clock, [Scattered(0.05)], seconds=2, offered=500)
    assert pacer.request_rate == pytest.approx(f.limit * HOLD)
    assert pacer.paused_until == paused


async def test_probing_climbs_while_the_pacer_binds_and_stops_at_the_ceiling() -> None:
    f, pacer, _, clock = finder(ceiling=51.0)
    serve(f, clock, [per_second(50)], seconds=3, offered=500)  # found, and paced under it
    found = pacer.request_rate
    for second in range(60):
        pacer.waits += 1  # requests are queueing at the pacer
        serve(f, clock, [], seconds=1, offered=500)  # the server has room again
        if second == int(SETTLE) - 3:
            assert pacer.request_rate == found  # settling first
    assert pacer.request_rate == 51.0
    f2, pacer2, _, clock2 = finder()
    serve(f2, clock2, [per_second(50)], seconds=3, offered=500)
    steady = pacer2.request_rate
    serve(f2, clock2, [], seconds=SETTLE + 5, offered=40)  # nobody waits: no reason to probe
    assert pacer2.request_rate == steady


# -- a run that can only wait ----------------------------------------------------------------------


async def test_a_quota_spent_until_midnight_stops_the_run_with_when_to_resume() -> None:
    f, _, _, clock = finder()
    serve(f, clock, [Quota(100)], seconds=5, offered=50)
    assert len(stopped) == 1
    assert stopped[0].code == "rate_limited"
    assert "UTC" in str(stopped[0])
    assert "daily quota" in str(stopped[0])


async def test_a_429_after_a_long_quiet_spell_stops_nothing() -> None:
    # Answers that take longer than --give-up-after (or a pipe with nothing in it for as
    # long), then one scattered 429: the server has not been refusing all that time.
    f, _, _, clock = finder(give_up=30.0)
    serve(f, clock, [], seconds=2, offered=100)
    clock.now += 700
    serve(f, clock, [Scattered(1.0)], seconds=0.05, offered=20)
    assert stopped == []


async def test_nothing_let_through_for_long_stops_the_run() -> None:
    f, _, _, clock = finder(give_up=30.0)
    serve(f, clock, [per_second(20)], seconds=5, offered=100)
    serve(f, clock, [Never()], seconds=25, offered=100)
    assert stopped == []  # refused for 25 s: still waiting
    serve(f, clock, [Never()], seconds=10, offered=100)
    assert len(stopped) == 1
    assert re.search(r"for 3\d\.\ds so far", str(stopped[0]))  # refused for 30 s and a little more


# -- the in-flight window ------------------------------------------------------------------------


async def test_the_window_doubles_with_time_while_nothing_comes_back() -> None:
    # Answers that take seconds: no success to grow on, and no refusal either. The waits the
    # window asks its timer for are recorded and run at once.
    loop = asyncio.get_running_loop()
    asked: list[float] = []
    call_later = loop.call_later

    def soon(delay: float, callback, *args):  # type: ignore[no-untyped-def]
        asked.append(delay)
        return call_later(0, callback, *args)

    loop.call_later = soon  # type: ignore[method-assign]
    try:
        w = Window(64, start=4, ramp=1.0)
        for _ in range(4):
            await w.acquire()
        waiting = [asyncio.ensure_future(w.acquire()) for _ in range(28)]
        for _ in range(1000):  # (not wait_for: its own timer would be run at once too)
            await asyncio.sleep(0)
            if all(waiter.done() for waiter in waiting):
                break
    finally:
        del loop.call_later
    assert w.in_flight == 32
    # 4 -> 32 is three doublings: three ramps of time, not 28 steps of one.
    assert sum(asked) == pytest.approx(3.0, rel=0.1)
    w.hold()  # pushback: no more quick growth
    blocked = asyncio.ensure_future(w.acquire())
    await asyncio.sleep(0)
    assert not blocked.done()
    assert w.size == 32
    blocked.cancel()


async def test_the_window_starts_small_grows_with_answers_and_never_passes_the_ceiling() -> None:
    w = Window(40, start=4, ramp=0)
    for _ in range(4):
        await w.acquire()
    blocked = asyncio.ensure_future(w.acquire())
    await asyncio.sleep(0)
    assert not blocked.done()
    w.grow()  # a success: room for half a request more...
    w.grow()  # ...and another half
    await asyncio.sleep(0)
    assert blocked.done()
    assert w.in_flight == 5
    for _ in range(1000):
        w.grow()
    assert w.size == 40
    w.shrink()
    assert w.size == 20
    w.open()
    assert w.size == 40


class Timers:
    """The loop's clock and timers, faked: each timer asked for is recorded (with its delay)
    and never run by the loop; `run_last` moves the clock to it and runs it, so nothing
    waits on the clock."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.now = self.loop.time()
        self.asked: list[tuple[float, asyncio.TimerHandle]] = []

    def __enter__(self) -> Timers:
        def call_at(when: float, callback, *args, context=None):  # type: ignore[no-untyped-def]
            handle = asyncio.TimerHandle(when, callback, args, self.loop, context)
            self.asked.append((when - self.now, handle))
            return handle

        self.loop.call_at = call_at  # type: ignore[method-assign]
        self.loop.time = lambda: self.now  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.loop.call_at, self.loop.time

    def run_last(self) -> float:
        delay, handle = self.asked.pop()
        self.now = handle.when()
        handle._run()
        return delay


async def turn() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_answers_that_come_back_together_send_their_successors_spread_in_time() -> None:
    # A clump of answers would send a clump of requests, half as big again each round trip,
    # and a bucket that ran dry in the middle of one would refuse all the rest of it.
    with Timers() as timers:
        w = Window(256, start=16, ramp=0)
        for _ in range(16):
            await w.acquire()
        waiting = [asyncio.ensure_future(w.acquire()) for _ in range(24)]
        await turn()
        for _ in range(16):  # sixteen answers in half a second, back at once
            w.grow(0.5)
            w.release()
        await turn()
        assert sum(waiter.done() for waiter in waiting) == 1  # not 24 at once
        delay = timers.run_last()
        assert 0.5 / (2 * 24) <= delay <= 0.5 / (2 * 16)  # twice the rate a window of 16-24 is answered
        await turn()
        assert sum(waiter.done() for waiter in waiting) == 2
        w.open()  # a pace bounds the rate: no spreading
        await turn()
        assert all(waiter.done() for waiter in waiting)


async def test_starts_spread_in_time_that_the_window_does_not_hold_back_do_not_grow_it() -> None:
    # Once answers have come back, every start goes through the spread; one that the window
    # lets through at once did not find it binding, and time alone must not grow it (50 lone
    # requests made a window of 16 one of 66).
    with Timers() as timers:
        w = Window(256, start=16)
        await w.acquire()
        w.grow(0.5)
        w.release()
        for _ in range(50):  # one at a time, far below the window
            timers.now += 1.0
            await w.acquire()
            await turn()
            while timers.asked:
                timers.run_last()
            w.release()
        assert w.size == 16.5


async def test_a_refusal_while_no_limit_is_known_stalls_the_window_until_its_fellows_are_back() -> None:
    f, _, window, clock = finder()
    with Timers() as timers:
        for _ in range(16):
            await window.acquire()
        waiting = asyncio.ensure_future(window.acquire())
        ticket = f.sent()
        clock.now += 0.004  # refused in 4 ms
        f.pushback(ticket, 0.02)
        window.release()
        window.grow()
        await turn()
        assert not waiting.done()  # nothing starts before the refusals in flight are back...
        assert timers.run_last() == pytest.approx(2 * 0.004, rel=0.1)  # ...two of its round trips
        await turn()
        assert waiting.done()


async def test_the_refused_requests_own_slot_waits_out_the_stall_too() -> None:
    # As the gate tells it: the slot freed by the refusal itself goes to nobody before the
    # refusals in flight are back (freed first, it went to a waiter at the refusal's instant).
    f, _, window, clock = finder()
    gate = Gate(Scopes(f))
    with Timers() as timers:
        slots = [await gate.enter(0) for _ in range(16)]
        for slot in slots:
            slot.go()
        waiting = asyncio.ensure_future(gate.enter(0))
        await turn()
        clock.now += 0.004  # refused in 4 ms
        slots[0].failed(http_error(429, "Rate limit exceeded"))
        await turn()
        assert not waiting.done()
        assert timers.run_last() == pytest.approx(2 * 0.004, rel=0.1)
        await turn()
        assert waiting.done()
        assert window.in_flight == 16


async def test_a_first_limit_read_restarts_the_window_small_and_the_next_opens_it() -> None:
    # A bucket that held a minute's quota lets the first second's many through: the pace
    # read from it is far too fast, and a full window at that pace would be refused whole.
    f, _, window, clock = finder()
    window.size = 200.0
    bucket = Bucket(capacity=600, rate=10)
    serve(f, clock, [bucket], seconds=0.65, offered=1000)
    assert f.limit is not None
    assert f.limit > 100  # the savings, read as a rate
    assert window.size <= 16  # small...
    assert window.threshold == 256  # ...and growing quickly
    serve(f, clock, [bucket], seconds=2, offered=1000)
    assert f.limit == pytest.approx(10, rel=0.2)
    assert window.size == 256


async def test_a_free_models_twenty_a_minute_is_found_and_kept_with_few_refusals() -> None:
    # OpenRouter's :free models: 20 requests a minute, counted per minute, answers in a second.
    clock = SimClock(1000.0)
    f = RateFinder(Pacer(), Window(64), clock=clock, stop=stopped.append)
    minute = PerWindow(length=60.0, requests=20, tokens=None)
    early = simulate(f, clock, [minute], seconds=120, offered=5, latency=1.0)
    assert f.limit == pytest.approx(20 / 60, rel=0.05)  # not thrown away as too slow to be one
    assert early.refusals(1000, 1120) <= 8  # two runs of four: its first minute, then its rate
    later = simulate(f, clock, [minute], seconds=480, offered=5, latency=1.0)
    assert len(later.refused) <= 2  # a probe
    assert later.rate(1180, 1600) >= 0.95 * 20 / 60


# -- against the mock ----------------------------------------------------------------------------


async def test_a_run_finds_an_unstated_limit_with_few_refusals(mock, make_settings, tmp_path: Path) -> None:
    rows = bodies(300)
    async with mock(rpm=6000, latency=0.02, record=False) as (url, server):
        # The mock counts per wall-clock second. Started late in one, the first reading spans
        # two of its counts and comes out too high, which takes a second run of refusals to
        # correct (tested on a fake clock above); a 3-second run may end first. So start
        # early in a second, and this test sees one reading, always the same.
        await asyncio.sleep(1.02 - time.time() % 1)
        started = time.monotonic()
        summary = await pipeline.run(make_settings(url, rows, concurrency=128))
        elapsed = time.monotonic() - started
    assert summary.exit_code == 0
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) == 300
    # One run of refusals, what was on its way when the server filled up (the mock shares
    # this test's event loop, so its refusals come back late), then none: the pace is right.
    assert len(server.state.refused_per_second) == 1
    assert server.state.statuses["429"] <= 100
    assert elapsed < 300 / 100 * 1.6  # near the limit's pace: 100 a second
    usage = orjson.loads((tmp_path / "out/usage.json").read_bytes())
    assert usage["runs"][-1]["rate_cuts"] >= 1
    assert 5000 <= usage["runs"][-1]["paced_at_rpm"] <= 6000


async def test_a_bucket_that_refuses_for_a_while_costs_no_request(
    mock, make_settings, tmp_path: Path
) -> None:
    # A minute's quota at once, then 10 a second, each 429 saying "try again in 71ms" in its
    # message only; two attempts allowed, so a request that spent one per 429 would fail.
    rows = bodies(640)
    async with mock(rpm=600, limit_style="bucket", latency=0.02, record=False) as (url, server):
        started = time.monotonic()
        summary = await pipeline.run(make_settings(url, rows, concurrency=64, max_attempts=2))
        elapsed = time.monotonic() - started
    assert summary.exit_code == 0
    assert summary.failed == 0
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) == 640
    assert server.state.statuses["429"] > 0
    assert elapsed < 40 / 10 * 1.5 + 2  # the 40 past the burst, near 10 a second


def latencies(
    f: RateFinder, clock: Clock, *, seconds: float, spread: list[float], scale: float = 1.0
) -> None:
    """100 successes a second, their latencies cycling through `spread` (times `scale`)."""
    for i in range(int(seconds * 100)):
        clock.now += 0.01
        f.success(f.sent(), spread[i % len(spread)] * scale)


SPREAD = [0.2, 0.5, 1.0, 3.0, 8.0]  # long and short answers: a median of 1 s


async def test_more_in_flight_that_buys_only_latency_cuts_the_window_once() -> None:
    f, pacer, window, clock = finder(size=64)
    window.taken = 16
    latencies(f, clock, seconds=20, spread=SPREAD)
    assert f.latency_cuts == 0  # answers of every length: no rise
    # Three times as many in flight, the same answers a second, three times the latency:
    # the server queues what it cannot yet serve.
    window.taken = 48
    latencies(f, clock, seconds=3, spread=SPREAD, scale=3.0)
    assert f.latency_cuts == 1
    assert window.size < 64 * 0.8
    latencies(f, clock, seconds=60, spread=SPREAD, scale=3.0)
    assert f.latency_cuts == 1  # the new latency is the usual now: no cut after cut
    assert pacer.request_rate is None  # latency never sets a rate
    assert f.cuts == 0


async def test_a_hold_that_lapses_does_not_undo_a_latency_cut() -> None:
    f, _, window, clock = finder(size=1000, window_start=20)
    window.taken = 16
    latencies(f, clock, seconds=1.5, spread=SPREAD)  # slow start; the usual latency is read
    for _ in range(10):  # a few 429s among answers: quick growth stops while a trend may show
        f.pushback(f.sent(), 1.0)
        f.success(f.sent())
    assert window.threshold < 1000
    window.taken = 64
    latencies(f, clock, seconds=5, spread=SPREAD, scale=3.0)  # queueing: the window is cut
    assert f.latency_cuts == 1
    assert window.threshold < 200  # the hold lapsed since, and left the cut as it was


async def test_answers_that_queue_at_more_in_flight_give_the_queue_back() -> None:
    # A minute's bucket runs dry with the window at its ceiling: answers that took 50 ms take
    # 130 (this process, or the server, reads them late), and a refusal waits as long while
    # what is sent meanwhile is refused with it.
    f, _, window, clock = finder(size=256)
    window.taken = 32
    latencies(f, clock, seconds=2, spread=[0.05, 0.051])
    assert window.size > 100  # growing quickly
    assert window.threshold == 256
    window.taken = 200
    latencies(f, clock, seconds=0.1, spread=[0.13, 0.131])
    # The same answers a second at 50 ms: some 200 * 50 / 130 in flight, and no quick growth.
    assert window.size < 200 * 0.05 / 0.13 * 1.2
    assert window.threshold < 200 * 0.05 / 0.13 * 1.2
    assert f.cuts == 0  # no limit read from latency


async def test_a_slower_server_or_answers_of_every_length_give_nothing_back() -> None:
    # And a server on this machine answering at once: the queue is all this process's turn.
    for spread, taken in (([0.05, 0.051], 48), (SPREAD, 200), ([0.0005, 0.00051], 200)):
        f, _, window, clock = finder(size=256)
        window.taken = 48
        latencies(f, clock, seconds=2, spread=spread)
        window.taken = taken  # the same in flight, slower; or more, answers of every length
        latencies(f, clock, seconds=1, spread=spread, scale=2.6 if spread[0] > 0.001 else 10)
        assert window.threshold == 256


def test_a_cut_never_grows_a_small_window() -> None:
    window = Window(2, start=2)
    window.shrink(0.75)
    assert window.size <= 2


async def test_a_slower_model_at_the_same_concurrency_cuts_nothing() -> None:
    # Longer answers, or a busier provider: latency up, nothing more in flight. Cutting the
    # window would only cost throughput.
    f, _, window, clock = finder(size=64)
    window.taken = 48
    latencies(f, clock, seconds=20, spread=SPREAD)
    latencies(f, clock, seconds=20, spread=SPREAD, scale=4.0)
    assert f.latency_cuts == 0
    assert window.size == 64


async def test_rising_latency_cuts_nothing_while_the_window_does_not_bind() -> None:
    f, _, window, clock = finder(size=64)
    window.taken = 4
    latencies(f, clock, seconds=20, spread=SPREAD)
    window.taken = 12  # more in flight, but far from the window: the queue is not ours
    latencies(f, clock, seconds=5, spread=SPREAD, scale=4.0)
    assert f.latency_cuts == 0
    assert window.size == 64


async def test_stated_limits_are_used_and_an_empty_budget_pauses() -> None:
    f, pacer, _, _ = finder()
    f.headers({"x-ratelimit-limit-requests": "600", "x-ratelimit-limit-tokens": "60000"})
    assert pacer.request_rate == pytest.approx(10 * 0.98)
    assert pacer.token_rate == pytest.approx(1000 * 0.98)
    now = asyncio.get_running_loop().time()
    f.headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"})
    assert pacer.paused_until == pytest.approx(now + 1.5, abs=0.1)


@pytest.mark.parametrize("limit", ["inf", "1e400", "nan", "0.5", "-600", "0", "", "lots"])
async def test_a_stated_limit_that_is_no_count_is_ignored(limit: str) -> None:
    # "inf" set an infinite rate; "1e400" too (float() reads it as inf).
    f, pacer, _, _ = finder()
    f.headers({"x-ratelimit-limit-requests": limit, "x-ratelimit-limit-tokens": limit})
    assert pacer.request_rate is None
    assert pacer.token_rate is None


async def test_a_budget_spent_until_a_moment_pauses_until_then() -> None:
    import time

    f, pacer, _, _ = finder()
    now = asyncio.get_running_loop().time()
    reset = str(int(time.time() * 1000) + 1500)  # OpenRouter's way: epoch milliseconds
    f.headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": reset})
    assert pacer.paused_until == pytest.approx(now + 1.5, abs=0.1)  # not MAX_PAUSE
    f.headers({"x-ratelimit-remaining-tokens": "-3", "x-ratelimit-reset-tokens": "nan"})
    assert pacer.paused_until == pytest.approx(now + 1.5, abs=0.1)


def test_reset_durations() -> None:
    assert parse_reset("6m0s") == 360
    assert parse_reset("20ms") == pytest.approx(0.02)
    assert parse_reset("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_reset("0.25") == 0.25
    assert parse_reset("soon") is None


async def test_an_outage_pauses_the_pool_longer_while_it_lasts() -> None:
    f, pacer, window, clock = finder()
    serve(f, clock, [], seconds=1, offered=100)
    loop = asyncio.get_running_loop()
    size = window.size
    for _ in range(300):  # the endpoint goes down: failures in a row
        clock.now += 0.01
        if f.failure(f.sent()):
            break
    assert f.outage.outages == 1
    assert pacer.paused_until == pytest.approx(loop.time() + 1.0, abs=0.1)
    assert window.size == 2  # then a couple of probes at a time, not the whole window
    clock.now += 1.0
    assert f.failure(f.sent())  # a probe: still down
    assert pacer.paused_until == pytest.approx(loop.time() + 2.0, abs=0.1)
    assert pacer.request_rate is None  # an outage is not a rate limit
    f.success(f.sent())  # up again: the window as it was
    assert (f.outage.down, window.size) == (False, size)


async def test_scattered_server_errors_pause_nothing() -> None:
    f, pacer, _, clock = finder()
    for n in range(1, 5001):
        clock.now += 0.002
        if n % 12 == 0:
            f.failure(f.sent())
        else:
            f.success(f.sent())
    assert f.outage.outages == 0
    assert pacer.paused_until == 0.0


async def test_a_run_paces_at_a_limit_the_server_states(mock, make_settings, tmp_path: Path) -> None:
    async with mock(rpm=6000, ratelimit_headers=True, latency=0.02, record=False) as (url, server):
        await asyncio.sleep(1.02 - time.time() % 1)  # early in the mock's second, as above
        summary = await pipeline.run(make_settings(url, bodies(300), concurrency=64))
    assert summary.exit_code == 0
    usage = orjson.loads((tmp_path / "out/usage.json").read_bytes())
    assert usage["runs"][-1]["paced_at_rpm"] == pytest.approx(6000 * 0.98, rel=0.01)
    assert server.state.statuses["429"] <= 16  # only what went before the first answer told
