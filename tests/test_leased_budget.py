"""A shared pace's budget against a store kept in memory: what it asks of the store, and
when (`pipeline.pace.leased`, `pipeline.pace.link`). The loop's clock stands still unless a
test moves it, and calls to the store are made by hand (`StoreLink._sync`): a busy machine
cannot make a leased start late, nor does anything wait on the link's timers."""

from __future__ import annotations

import asyncio
import dataclasses
import selectors
from typing import Any

import anyio
import pytest

from pipeline.pace.account import AccountPace
from pipeline.pace.finder import RateFinder
from pipeline.pace.leased import shared_pacer
from pipeline.pace.pacer import Pacer
from pipeline.pace.store import BOOT_RATE, RUN, WATCH, Ask, Logged, Reply
from pipeline.pace.window import Window


class Clock:
    """The running loop's clock, moved by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(asyncio.get_running_loop(), "time", lambda: self.now)


class MemoryStore:
    """Leases what is asked, from now (or the pause's end), at the rates given; keeps the
    account's pause till `paused`. Its clock is the loop's. Notes each call's arguments."""

    def __init__(self, paused: float = 0.0) -> None:
        self.paused = paused
        self.calls: list[dict[str, Any]] = []

    async def check(self) -> None:
        pass

    async def call(self, ask: Ask) -> Reply:
        kwargs = dataclasses.asdict(ask)
        self.calls.append(kwargs)
        now = asyncio.get_running_loop().time()
        want, rate, tokens = kwargs["want"], kwargs["given"], kwargs["want_tokens"]
        start = max(now, self.paused) if want and rate else -1.0
        token_start = max(now, self.paused) if tokens and kwargs["given_tokens"] else -1.0
        return Reply(now, rate, start, token_start, self.paused, 1, True, False, -1, -1, want if rate else 0)

    async def read(self, since: float, until: float) -> Logged:
        return Logged(0, 0, 0)

    async def close(self) -> None:
        pass


class _HeldStore(MemoryStore):
    """The account's pace with its real rules (`AccountPace`), on the loop's clock, at once."""

    def __init__(self, pace: AccountPace) -> None:
        super().__init__()
        self.pace = pace

    async def call(self, ask: Ask) -> Reply:
        self.calls.append(dataclasses.asdict(ask))
        return self.pace.call(ask)

    async def read(self, since: float, until: float) -> Logged:
        return self.pace.read(since, until)


def _pacer(store: MemoryStore, **rates: float) -> Pacer:
    return shared_pacer(lambda: store, "memory", say=lambda _: None, **rates)  # type: ignore[arg-type]


async def _sync(pacer: Pacer, store: MemoryStore) -> dict[str, Any]:
    """One call to the store, as the link's loop makes it; returns what it asked."""
    assert pacer.account is not None
    await pacer.account._sync(store, asyncio.get_running_loop())
    return store.calls[-1]


async def _turns() -> None:
    """Let the loop run what is due now (the clock standing still)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def _two_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> tuple[Clock, _HeldStore, list[Pacer], list[RateFinder]]:
    """Two processes p0 and p1 of one account, each a shared pacer and its finder, on the
    account's real rules and a fake clock, each seen by the store once."""
    clock = Clock(monkeypatch)
    store = _HeldStore(AccountPace(boot_rate=BOOT_RATE, watch=WATCH, run=RUN, clock=lambda: clock.now))
    pacers = [_pacer(store, processes=2) for _ in range(2)]
    finders = [RateFinder(pacer, Window(64), clock=lambda: clock.now) for pacer in pacers]
    for i, pacer in enumerate(pacers):
        assert pacer.account is not None
        pacer.account._pid = f"p{i}"
        await _sync(pacer, store)
    return clock, store, pacers, finders


@pytest.mark.parametrize("leased", ["starts", "tokens"])
async def test_a_lease_that_comes_with_a_pause_long_over_is_not_asked_for_again(
    monkeypatch: pytest.MonkeyPatch, leased: str
) -> None:
    """The store tells the account's last pause with every reply, long after it ended. Taken
    before the starts (or tokens) leased in the same reply, it woke the queue on a budget
    still empty, which asked the store for a second lease: a call and a lease more than the
    old pace made, each time the process ran dry after any pause in the account's run."""
    clock = Clock(monkeypatch)
    store = MemoryStore(paused=clock.now - 5.0)
    pacer = _pacer(store, **({"request_rate": 40.0} if leased == "starts" else {"token_rate": 1000.0}))
    waiter = asyncio.ensure_future(pacer.acquire(100))
    await _turns()  # queued: its lease is asked for
    asked = await _sync(pacer, store)
    # A tenth of a second at 40 a second; four requests' tokens.
    assert (asked["want"], asked["want_tokens"]) == ((4, 0) if leased == "starts" else (0, 400))
    await _turns()
    assert waiter.done()
    asked = await _sync(pacer, store)  # three starts (or requests' tokens) in hand: nothing to ask
    assert (asked["want"], asked["want_tokens"]) == (0, 0)


async def test_nothing_is_asked_of_the_store_before_a_pause_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pause holds every request back whatever the budget: no lease is asked for while it
    lasts (the store leases none before its end), tokens no more than starts; the first call
    after it asks, and the waiter goes on what comes back."""
    clock = Clock(monkeypatch)
    store = MemoryStore()
    pacer = _pacer(store, token_rate=1000.0)
    pacer.pause(5.0)
    waiter = asyncio.ensure_future(pacer.acquire(100))
    await _turns()
    assert (await _sync(pacer, store))["want_tokens"] == 0  # the old pace asked 400 here
    clock.now += 5.0
    await _turns()  # the pause's end: its lease is asked for
    assert (await _sync(pacer, store))["want_tokens"] == 400
    await _turns()
    assert waiter.done()


async def test_starts_gone_late_in_a_pause_are_not_told_as_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that holds leased starts may send without calling, so the store waits for
    its next call before it reads the account's log as whole. Starts gone late in a pause
    (a Retry-After for the pool) cannot be spent: the old pace dropped them on its next
    reply (and told the call after), the one pace kept them, and told the store it held
    starts till the pause ended (the account's readings waited for its calls)."""
    clock = Clock(monkeypatch)
    store = MemoryStore()
    pacer = _pacer(store, request_rate=40.0)
    first = asyncio.ensure_future(pacer.acquire())
    await _turns()
    await _sync(pacer, store)  # four starts leased
    await _turns()
    assert first.done()
    pacer.pause(5.0)
    waiter = asyncio.ensure_future(pacer.acquire())
    await _turns()
    assert (await _sync(pacer, store))["holds"]  # three in hand, due now
    clock.now += 1.0
    assert not (await _sync(pacer, store))["holds"]
    clock.now += 4.0
    await _turns()
    await _sync(pacer, store)  # the pause over: its lease
    await _turns()
    assert waiter.done()


class _VirtualSelector(selectors.DefaultSelector):
    """Time passes only when nothing is ready: the loop jumps to its next timer."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if not ready and timeout:
            self.now += timeout
        return ready


class _VirtualLoop(asyncio.SelectorEventLoop):
    def __init__(self) -> None:
        self.selector = _VirtualSelector()
        super().__init__(self.selector)

    def time(self) -> float:
        return self.selector.now


class _AccountStore:
    """The account's pace with its real rules (`AccountPace`), in memory, on the loop's clock;
    a call takes a few hundred microseconds each way."""

    def __init__(self, pace: AccountPace) -> None:
        self.pace = pace

    async def check(self) -> None:
        pass

    async def call(self, ask: Ask) -> Reply:
        await asyncio.sleep(0.0003)
        reply = self.pace.call(ask)
        await asyncio.sleep(0.0003)
        return reply

    async def read(self, since: float, until: float) -> Logged:
        return self.pace.read(since, until)

    async def close(self) -> None:
        pass


def test_four_processes_held_by_both_limits_send_at_the_rate_that_binds() -> None:
    """--rpm 2400 and --tpm 120000 at 50 tokens a request (both bind at 40 a second), four
    processes: starts and tokens leased apart fell due at different times, each gone late
    while it waited for the other, and the account sent half its limit (62 of 120 in 3 s)."""
    loop = _VirtualLoop()
    pace = AccountPace(boot_rate=BOOT_RATE, watch=WATCH, run=RUN, clock=lambda: loop.time() + 1e6)
    starts: list[float] = []

    async def process(i: int) -> None:
        pacer = shared_pacer(
            lambda: _AccountStore(pace),
            "memory",
            request_rate=40.0,
            token_rate=2000.0,
            processes=4,
            say=lambda _: None,
        )  # type: ignore[arg-type,return-value]
        assert pacer.account is not None
        pacer.account._pid = f"p{i}"

        async def worker() -> None:
            while True:
                reserved = await pacer.acquire(50)
                starts.append(loop.time())
                await asyncio.sleep(0.05)
                pacer.settle(reserved, 50)

        async with anyio.create_task_group() as tg:
            tg.start_soon(pacer.run)
            for _ in range(8):
                tg.start_soon(worker)
            await asyncio.sleep(3.0)
            tg.cancel_scope.cancel()

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            for i in range(4):
                tg.start_soon(process, i)

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    first = min(starts)
    assert 110 <= len(starts) <= 122  # 40 a second for 3 s, and a lease's worth ahead at most
    for second in (0, 1, 2):  # never more than the limit in any second
        assert sum(1 for t in starts if first + second <= t < first + second + 1) <= 41


async def test_a_process_whose_own_reading_was_lower_does_not_pull_the_account_down_when_it_probes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every process reads the account's full moments itself, and publishes what it read: one
    read 430 (its reading taken before the account's log was whole), the others 1,010 after it,
    and the account went on at 980 a second. Ten seconds on, the low reader's probe (which
    starts at 97 % of its own limit) told the store 417 as a rate found, every process went to
    it at once and climbed back along the probe's curve (16 shards: 987 a second for 10 s,
    then 431, 427, ... 798: 73 % of the limit in one bench run of fifteen)."""
    clock, store, pacers, finders = await _two_processes(monkeypatch)
    low, high = finders
    low._read(430.0, True)  # as the link calls it with its reading
    await _sync(pacers[0], store)
    high._read(1010.0, True)  # still ramping when it read: its reading goes in after
    await _sync(pacers[1], store)
    await _sync(pacers[0], store)
    assert pacers[0].request_rate == pytest.approx(1010 * 0.97)
    clock.now += 11.0  # the pace has held SETTLE seconds, and binds: the low reader probes
    waiter = asyncio.ensure_future(pacers[0].acquire())
    await _turns()
    ticket = low.sent()
    low.success(ticket, 0.02)
    await _sync(pacers[0], store)
    await _sync(pacers[1], store)
    assert (pacers[1].request_rate or 0.0) >= 1010 * 0.97  # the account at the reading in force
    waiter.cancel()


@pytest.mark.parametrize("own", [1000.0, 430.0, 1339.0])
async def test_when_the_process_whose_reading_is_in_force_has_ended_another_probes_for_all(
    monkeypatch: pytest.MonkeyPatch, own: float
) -> None:
    """Only the process whose reading is in force probes above it. Its shard done, the store
    still named it: no other probed again, and a limit that rose was never used (at 970 a
    second for good). Gone 5 s (not seen, as the processes are counted), another leads, and
    probes from the pace in force, not from a reading of its own that was not (`own`): from a
    lower one its probe began under the pace, and took the account down to it; from a higher
    one, it began 30 % over the limit."""
    clock, store, pacers, finders = await _two_processes(monkeypatch)
    for pacer, finder, reading in zip(pacers, finders, (own, 1000.0), strict=True):
        finder._read(reading, True)
        await _sync(pacer, store)
    await _sync(pacers[0], store)  # p1's reading is in force; p1 ends, and calls no more
    rates = []
    for _ in range(30):
        clock.now += 1.0
        waiter = asyncio.ensure_future(pacers[0].acquire())  # the pace binds
        await _turns()
        finders[0].success(finders[0].sent(), 0.02)
        await _sync(pacers[0], store)
        waiter.cancel()
        rates.append(pacers[0].request_rate or 0.0)
    assert rates[3] == pytest.approx(970.0)  # p1 still counted: its reading holds
    assert min(rates) == pytest.approx(970.0)  # never under the pace in force
    assert min(r for r in rates if r > 971.0) < 1000.0  # the probe crosses the limit slowly
    assert max(rates) > 1000.0  # then p0 probes: a limit that rose is found


async def test_a_refused_probe_of_a_process_that_took_over_goes_back_to_the_pace_in_force(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The process leading since the one whose reading was in force ended probes from the pace in
    force (1,000 read there, 430 here). Its probe refused, the pace goes back under the limit
    the probe climbed from, not to this process's own reading: set_rates publishes a lower rate,
    and every process went to 417 a second."""
    clock, store, pacers, finders = await _two_processes(monkeypatch)
    for pacer, finder, reading in zip(pacers, finders, (430.0, 1000.0), strict=True):
        finder._read(reading, True)
        await _sync(pacer, store)
    await _sync(pacers[0], store)  # p1's reading is in force; p1 ends, and calls no more
    pacer, finder = pacers[0], finders[0]
    while (pacer.request_rate or 0.0) <= 1000.0:  # p0 leads, and probes past the limit
        clock.now += 1.0
        waiter = asyncio.ensure_future(pacer.acquire())  # the pace binds
        await _turns()
        finder.success(finder.sent(), 0.02)
        await _sync(pacer, store)
        waiter.cancel()
        assert clock.now < 1100.0
    finder.pushback(finder.sent(), None)  # the probe is refused
    await _sync(pacer, store)
    assert (pacer.request_rate or 0.0) >= 970.0 * 0.999  # back to the pace in force, not 417


async def test_a_probe_refused_at_another_process_than_the_leader_ends_for_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every process read 1,000; the leader's probe climbs past it, and the first refusal is
    another process's (at 16 shards, fifteen of sixteen are): the probe was refused, and the
    pace goes back under the limit for all, not on up the probe's curve till a run."""
    clock, store, pacers, finders = await _two_processes(monkeypatch)
    for pacer, finder in zip(pacers, finders, strict=True):
        finder._read(1000.0, True)
        await _sync(pacer, store)
    other, leader = pacers
    while (leader.request_rate or 0.0) <= 1000.0:  # p1's reading in force: it probes, for all
        clock.now += 1.0
        waiter = asyncio.ensure_future(leader.acquire())  # the pace binds
        await _turns()
        finders[1].success(finders[1].sent(), 0.02)
        await _sync(leader, store)
        await _sync(other, store)
        waiter.cancel()
        assert clock.now < 1100.0
    assert (other.request_rate or 0.0) > 1000.0  # the probe is the account's pace
    finders[0].pushback(finders[0].sent(), None)  # refused at p0
    for pacer in pacers:
        await _sync(pacer, store)
        assert (pacer.request_rate or 0.0) <= 970.0 * 1.0001
