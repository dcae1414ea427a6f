"""Finding an unstated rate limit from the answers, on a fake clock; and the in-flight window."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

import pipeline
from pipeline.adaptive import HOLD, SETTLE, STEP, RateFinder, parse_reset
from pipeline.limits import Pacer, Window
from tests.conftest import bodies, read_jsonl


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def finder(*, ceiling: float | None = None, size: int = 256) -> tuple[RateFinder, Pacer, Window, Clock]:
    clock = Clock()
    pacer = Pacer(request_rate=ceiling)
    window = Window(size)
    return RateFinder(pacer, window, ceiling=ceiling, clock=clock), pacer, window, clock


def answers(
    f: RateFinder,
    clock: Clock,
    *,
    seconds: float,
    rate: float,
    pushback: float = 0.0,
    until_cut: bool = False,
) -> None:
    """`rate` answers a second for `seconds`, a share `pushback` of them 429s, evenly mixed;
    with `until_cut`, only until the pace changes (later answers would come after a pause)."""
    n = int(seconds * rate)
    owed = 0.0
    cuts = f.cuts
    for _ in range(n):
        if until_cut and f.cuts != cuts:
            return
        clock.now += 1 / rate
        owed += pushback
        if owed >= 1:
            owed -= 1
            f.pushback(1.0, f.epoch)
        else:
            f.success(f.epoch)


async def test_scattered_429s_never_start_pacing() -> None:
    f, pacer, window, clock = finder()
    answers(f, clock, seconds=30, rate=500, pushback=0.03)
    assert pacer.request_rate is None
    assert f.cuts == 0
    assert window.size == 256  # the window grew to the ceiling all the same


async def test_scattered_429s_early_in_a_run_do_not_leave_the_window_small() -> None:
    # 10 % of answers refused, from the start, as an aggregator's upstreams may: enough to
    # stop the window's quick growth for a while, never a trend that cuts anything.
    f, pacer, _, clock = finder()
    window = f.window = Window(256, start=16)
    answers(f, clock, seconds=0.2, rate=500, pushback=0.1)
    held = window.size
    assert held < 256
    answers(f, clock, seconds=4, rate=500, pushback=0.1)
    assert window.size == 256  # growing by one a round trip from `held` would take minutes
    assert pacer.request_rate is None
    assert f.cuts == 0


def latencies(
    f: RateFinder, clock: Clock, *, seconds: float, spread: list[float], scale: float = 1.0
) -> None:
    """100 successes a second, their latencies cycling through `spread` (times `scale`)."""
    for i in range(int(seconds * 100)):
        clock.now += 0.01
        f.success(f.epoch, spread[i % len(spread)] * scale)


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
    f, _, _, clock = finder()
    window = f.window = Window(1000, start=20)
    window.taken = 16
    latencies(f, clock, seconds=1.5, spread=SPREAD)  # slow start; the usual latency is read
    for _ in range(10):
        f.pushback(1.0, f.epoch)  # a few 429s: quick growth stops while a trend may show
    assert window.threshold < 1000
    window.taken = 64
    latencies(f, clock, seconds=5, spread=SPREAD, scale=3.0)  # queueing: the window is cut
    assert f.latency_cuts == 1
    assert window.threshold < 200  # the hold lapsed since, and left the cut as it was


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


async def test_a_storm_finds_the_limit_pauses_the_pool_and_halves_the_window() -> None:
    f, pacer, window, clock = finder()
    answers(f, clock, seconds=1, rate=50)  # the server lets 50 a second through...
    loop_now = asyncio.get_running_loop().time()
    answers(f, clock, seconds=0.2, rate=200, pushback=1.0, until_cut=True)  # ...then refuses the rest
    assert f.cuts == 1
    assert f.limit == pytest.approx(50, rel=0.05)
    assert pacer.request_rate == pytest.approx(50 * HOLD, rel=0.05)
    assert pacer.paused_until >= loop_now + 1.0  # the Retry-After, for everyone
    assert window.size < 256


async def test_answers_to_requests_sent_before_a_cut_do_not_cut_again() -> None:
    f, pacer, _, clock = finder()
    answers(f, clock, seconds=1, rate=50)
    old = f.epoch
    answers(f, clock, seconds=0.2, rate=200, pushback=1.0, until_cut=True)
    rate = pacer.request_rate
    for _ in range(100):  # the rest of what was in flight comes back refused
        clock.now += 0.001
        f.pushback(1.0, old)
    assert pacer.request_rate == rate
    assert f.cuts == 1


async def test_overshoot_above_a_known_limit_steps_back_without_a_pause() -> None:
    f, pacer, _, clock = finder()
    f.limit = 50.0
    pacer.set_request_rate(52.0)
    answers(f, clock, seconds=2, rate=52, pushback=0.03)
    assert pacer.request_rate == pytest.approx(50 * HOLD)
    assert pacer.paused_until == 0.0


async def test_a_limit_read_too_high_is_read_again_from_what_gets_through() -> None:
    # A first reading that spans two of the server's counting windows sees twice its limit;
    # paced just under that, the server refuses what is over its 100 a second.
    f, pacer, _, clock = finder()
    f.limit = 116.0
    pacer.set_request_rate(116 * HOLD)
    answers(f, clock, seconds=3, rate=112.5, pushback=0.12)
    assert f.limit == pytest.approx(100, rel=0.05)
    assert pacer.request_rate == pytest.approx(100 * HOLD, rel=0.05)


async def test_scattered_429s_at_a_known_limit_never_ratchet_it_down() -> None:
    f, pacer, _, clock = finder()
    f.limit = 100.0
    pacer.set_request_rate(100 * HOLD)
    answers(f, clock, seconds=30, rate=97, pushback=0.03)
    assert f.limit == 100.0
    assert pacer.request_rate == pytest.approx(100 * HOLD)


async def test_probing_creeps_up_while_the_pacer_binds_and_stops_at_the_ceiling() -> None:
    f, pacer, _, clock = finder(ceiling=51.0)
    f.limit = 50.0
    pacer.set_request_rate(50 * HOLD)
    f._new_epoch(clock.now)
    for second in range(40):
        pacer.waits += 1  # requests are queueing at the pacer
        answers(f, clock, seconds=1, rate=48)
        if second == int(SETTLE) - 2:
            assert pacer.request_rate == pytest.approx(50 * HOLD)  # settling first
    assert pacer.request_rate == 51.0
    f2, pacer2, _, clock2 = finder()
    f2.limit = 50.0
    pacer2.set_request_rate(40.0)
    answers(f2, clock2, seconds=SETTLE + 5, rate=40)  # nobody waits: no reason to probe
    assert pacer2.request_rate == 40.0
    assert STEP > 0


async def test_stated_limits_are_used_and_an_empty_budget_pauses() -> None:
    f, pacer, _, _ = finder()
    f.headers({"x-ratelimit-limit-requests": "600", "x-ratelimit-limit-tokens": "60000"})
    assert pacer.request_rate == pytest.approx(10 * 0.98)
    assert pacer.token_rate == pytest.approx(1000 * 0.98)
    now = asyncio.get_running_loop().time()
    f.headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1.5s"})
    assert pacer.paused_until == pytest.approx(now + 1.5, abs=0.1)


def test_reset_durations() -> None:
    assert parse_reset("6m0s") == 360
    assert parse_reset("20ms") == pytest.approx(0.02)
    assert parse_reset("1h2m3.5s") == pytest.approx(3723.5)
    assert parse_reset("0.25") == 0.25
    assert parse_reset("soon") is None


async def test_the_window_starts_small_grows_and_never_passes_the_ceiling() -> None:
    w = Window(40, start=4)
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


async def test_a_run_finds_an_unstated_limit_without_a_storm(mock, make_settings, tmp_path: Path) -> None:
    rows = bodies(300)
    async with mock(rpm=6000, latency=0.02, record=False) as (url, server):
        # The mock counts per wall-clock second. Started late in one, the first reading spans
        # two of its counts and comes out up to twice the limit, which takes a second burst
        # to correct (tested on a fake clock above); a 3-second run may end first. So start
        # early in a second, and this test sees one reading, always the same.
        await asyncio.sleep(1.02 - time.time() % 1)
        started = time.monotonic()
        summary = await pipeline.run(make_settings(url, rows, concurrency=128))
        elapsed = time.monotonic() - started
    assert summary.exit_code == 0
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) == 300
    refused = server.state.statuses["429"]
    assert refused <= 110  # about what the server lets through in its first second, not a storm
    assert elapsed < 300 / 100 * 1.6  # near the limit's pace: 100 a second
    usage = orjson.loads((tmp_path / "out/usage.json").read_bytes())
    assert usage["runs"][-1]["rate_cuts"] >= 1
    assert 5000 <= usage["runs"][-1]["paced_at_rpm"] <= 6000


async def test_an_outage_pauses_the_pool_longer_while_it_lasts() -> None:
    f, pacer, _, clock = finder()
    answers(f, clock, seconds=1, rate=100)
    loop = asyncio.get_running_loop()
    for _ in range(300):  # the endpoint goes down: within a window, most answers fail
        clock.now += 0.01
        f.failure(f.epoch)
        if f.outages:
            break
    assert f.outages == 1
    assert pacer.paused_until == pytest.approx(loop.time() + 1.0, abs=0.1)
    for _ in range(30):  # still down after the pause
        clock.now += 0.01
        f.failure(f.epoch)
        if f.outages == 2:
            break
    assert f.outages == 2
    assert pacer.paused_until == pytest.approx(loop.time() + 2.0, abs=0.1)
    assert pacer.request_rate is None  # an outage is not a rate limit


async def test_scattered_server_errors_pause_nothing() -> None:
    f, pacer, _, clock = finder()
    for n in range(1, 5001):
        clock.now += 0.002
        if n % 12 == 0:
            f.failure(f.epoch)
        else:
            f.success(f.epoch)
    assert f.outages == 0
    assert pacer.paused_until == 0.0
