"""The pacer on a fake clock: even spacing, first come first served, settle, pause; and what a
request's token reservation becomes at the gate."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from pipeline.pace.finder import RateFinder
from pipeline.pace.gate import Gate
from pipeline.pace.pacer import Pacer
from pipeline.pace.scopes import Scopes
from pipeline.pace.window import Window
from pipeline.send.status import http_error


class FakeClock:
    """Drives the running loop's clock by hand, so rate tests take no real time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.now = 1000.0
        self.loop = loop

    def time(self) -> float:
        return self.now

    async def run(self, pacer: Pacer, tasks: list[asyncio.Task[None]]) -> None:
        """Let the tasks run, jumping the clock to each timer the pacer sets."""
        for _ in range(10_000):
            for _ in range(5):
                await asyncio.sleep(0)
            if all(t.done() for t in tasks):
                return
            timer = pacer._timer
            assert timer is not None, "a waiter with no timer to wake it would wait forever"
            self.now = max(self.now, timer.when())
        raise AssertionError("did not finish")


@pytest.fixture
async def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    loop = asyncio.get_running_loop()
    fake = FakeClock(loop)
    monkeypatch.setattr(loop, "time", fake.time)
    return fake


async def starts(clock: FakeClock, pacer: Pacer, costs: list[int]) -> list[tuple[int, float]]:
    started: list[tuple[int, float]] = []

    async def one(i: int, tokens: int) -> None:
        await pacer.acquire(tokens)
        started.append((i, clock.now))

    tasks = []
    for i, tokens in enumerate(costs):
        tasks.append(asyncio.ensure_future(one(i, tokens)))
        await asyncio.sleep(0)  # queue in order
    await clock.run(pacer, tasks)
    return started


async def test_requests_start_evenly_spaced_at_the_rate(clock: FakeClock) -> None:
    pacer = Pacer(request_rate=10)
    times = [t for _, t in await starts(clock, pacer, [0] * 21)]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(abs(g - 0.1) < 1e-9 for g in gaps), gaps
    assert times[-1] - times[0] == pytest.approx(2.0)


async def test_take_starts_a_request_whose_turn_has_come_and_wait_the_next_at_its_turn(
    clock: FakeClock,
) -> None:
    pacer = Pacer(request_rate=10, token_rate=1000)
    assert pacer.take(200) == 200  # its turn has come: started, its tokens reserved
    t0 = clock.now
    assert pacer.take(100) is None  # the next's is 0.2 s away (its tokens' time): not started
    task = asyncio.ensure_future(pacer.wait(100))
    await clock.run(pacer, [task])
    assert task.result() == 100
    assert clock.now - t0 == pytest.approx(0.2)
    assert pacer.take(0) is None  # (and the next is spaced after it, not after the refused take)
    clock.now += 0.1
    assert pacer.take(0) == 0


async def test_big_requests_are_not_starved_by_small_ones(clock: FakeClock) -> None:
    pacer = Pacer(token_rate=1000)  # 1,000 tokens a second
    order = [i for i, _ in await starts(clock, pacer, [100, 5000, 100, 100, 100])]
    assert order == [0, 1, 2, 3, 4]


async def test_token_spacing_follows_the_reservations(clock: FakeClock) -> None:
    pacer = Pacer(token_rate=1000)
    started = await starts(clock, pacer, [500, 500, 2000, 500])
    times = [t for _, t in started]
    # each request may start once the tokens reserved before it have been paid for
    assert [round(t - times[0], 6) for t in times] == [0.0, 0.5, 1.0, 3.0]


async def test_settling_below_the_reservation_gives_the_time_back(clock: FakeClock) -> None:
    pacer = Pacer(token_rate=1000)
    await pacer.acquire(3000)  # next may start 3 s later...
    pacer.settle(3000, 1000)  # ...but it used a third of it
    t0 = clock.now
    [(_, t)] = await starts(clock, pacer, [100])
    assert t - t0 == pytest.approx(1.0)


async def test_a_pause_holds_everyone_back(clock: FakeClock) -> None:
    pacer = Pacer()
    t0 = clock.now
    pacer.pause(5.0)
    times = [t for _, t in await starts(clock, pacer, [0, 0, 0])]
    assert times == [t0 + 5.0] * 3
    before = clock.now
    await pacer.acquire()  # the pause is over: no wait
    assert clock.now == before


async def test_with_no_limit_acquire_never_waits(clock: FakeClock) -> None:
    pacer = Pacer()
    for _ in range(1000):
        await pacer.acquire(10_000)
    assert pacer._timer is None


async def test_a_cancelled_waiter_does_not_hold_up_the_queue(clock: FakeClock) -> None:
    pacer = Pacer(request_rate=1)
    await pacer.acquire()
    doomed = asyncio.ensure_future(pacer.acquire())
    await asyncio.sleep(0)
    started: list[float] = []

    async def after() -> None:
        await pacer.acquire()
        started.append(clock.now)

    task = asyncio.ensure_future(after())
    await asyncio.sleep(0)
    doomed.cancel()
    t0 = clock.now
    await clock.run(pacer, [task])
    assert started == [pytest.approx(t0 + 1.0)]


def _gate(pacer: Pacer) -> Gate:
    window = Window(16)
    return Gate(Scopes(RateFinder(pacer, window)))


@pytest.mark.parametrize(
    ("end", "kept"),
    [
        ("answered", True),  # using 100 of its 500: a server counting on arrival counted 500
        ("refused", True),  # counted nothing, but the server is full: not into it again at once
        ("bad request", False),  # answered, not counted
        ("never sent", False),
    ],
)
async def test_what_a_request_reserved_comes_back_only_when_it_was_not_counted(
    clock: FakeClock, end: str, kept: bool
) -> None:
    pacer = Pacer(token_rate=1000)
    gate = _gate(pacer)
    t0 = clock.now
    slot = await gate.enter(500)  # a prompt and max_tokens: 500
    if end == "never sent":
        slot.unused()
    else:
        slot.go()
    if end == "answered":
        slot.answered(0.1, None, 100)
    elif end != "never sent":
        slot.failed(http_error(429 if end == "refused" else 400, "no"))
    [(_, t)] = await starts(clock, pacer, [500])
    assert t - t0 == pytest.approx(0.5 if kept else 0.0)


async def test_a_token_limit_stated_while_requests_wait_is_reserved_for_them(clock: FakeClock) -> None:
    # The first answer's headers state the limit while the next requests wait their turn:
    # they go within it, not around it (each reserved nothing, decided before it waited).
    pacer = Pacer(request_rate=10)
    gate = _gate(pacer)
    first = await gate.enter(500)
    waiting = [asyncio.ensure_future(gate.enter(500)) for _ in range(2)]
    await asyncio.sleep(0)
    pacer.set_token_rate(1000)
    t0 = clock.now
    await clock.run(pacer, waiting)
    assert [first.reserved, *(w.result().reserved for w in waiting)] == [[0], [500], [500]]
    assert clock.now - t0 == pytest.approx(0.6)  # 0.1 apart, then the tokens of the first


async def test_the_reader_waits_for_half_the_buffer_to_be_taken() -> None:
    from pipeline.run.control import Refill

    refill = Refill(3)
    waiting = asyncio.ensure_future(refill.room())
    await asyncio.sleep(0)
    assert refill.owed == 3
    refill.taken(10)
    refill.taken(10)
    await asyncio.sleep(0)
    assert not waiting.done()  # two taken of three: still full enough
    refill.taken(10)
    await asyncio.sleep(0)
    assert waiting.done()
    assert refill.owed == 0  # nobody waits: workers skip the bookkeeping


async def test_a_waiting_reader_can_be_woken_or_cancelled() -> None:
    from pipeline.run.control import Refill

    refill = Refill(100)
    waiting = asyncio.ensure_future(refill.room())
    await asyncio.sleep(0)
    refill.wake()
    await asyncio.sleep(0)
    assert waiting.done()
    waiting = asyncio.ensure_future(refill.room())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert refill.owed == 0


async def test_the_read_ahead_holds_its_bytes_worth_and_a_bigger_line_alone() -> None:
    from pipeline.run.control import Refill

    refill = Refill(100, max_bytes=1000)
    assert refill.fits(5000)  # nothing held: a line bigger than the budget still goes, alone
    refill.put(5000)
    assert not refill.fits(1)
    waiting = asyncio.ensure_future(refill.room(1))
    await asyncio.sleep(0)
    refill.taken(5000)
    await asyncio.sleep(0)
    assert waiting.done()
    refill.put(600)
    assert refill.fits(400)
    assert not refill.fits(401)
