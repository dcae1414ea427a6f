"""One limit for many processes, through a real Redis started on 127.0.0.1 by the test."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as redis

import pipeline
from pipeline.errors import SettingsError
from pipeline.pace.account import AccountPace
from pipeline.pace.accountlog import STALE, AccountLog
from pipeline.pace.finder import RateFinder
from pipeline.pace.lease import TokenLeases
from pipeline.pace.leased import MAX_LEASE, shared_pacer
from pipeline.pace.link import StoreLink
from pipeline.pace.pacer import Pacer
from pipeline.pace.reading import READ_WAIT, AccountCapacity, Moment
from pipeline.pace.store import BOOT_RATE, RUN, WATCH, Ask, Logged, Reply, Store, account_key
from pipeline.pace.window import Window
from pipeline.send.waits import per_minute
from tests.conftest import FAKE_KEY, RedisServer, bodies, read_jsonl, write_jsonl
from tests.test_crash import start

RATE = 40.0  # requests a second for the account


async def _starts(pacers: list[Pacer], seconds: float) -> list[tuple[int, float]]:
    """Every pacer acquiring as fast as it may for `seconds`: (which, when) of each start."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    seen: list[tuple[int, float]] = []

    async def spend(i: int, pacer: Pacer) -> None:
        while loop.time() - began < seconds:
            await pacer.acquire()
            seen.append((i, loop.time() - began))
            await asyncio.sleep(0)

    async with anyio.create_task_group() as tg:
        for pacer in pacers:
            tg.start_soon(pacer.run)
        with anyio.move_on_after(seconds + 1):
            async with anyio.create_task_group() as spenders:
                for i, pacer in enumerate(pacers):
                    spenders.start_soon(spend, i, pacer)
        tg.cancel_scope.cancel()
    return [(i, at) for i, at in seen if at < seconds]


class CountedStore(Store):
    """The Redis store, counting the calls made to it."""

    calls = 0

    async def call(self, ask: Ask) -> Reply:
        CountedStore.calls += 1
        return await super().call(ask)


async def test_four_processes_start_the_accounts_rate_together(redis_server: RedisServer) -> None:
    account = account_key("http://x/v1", FAKE_KEY)
    CountedStore.calls = 0
    pacers = [
        shared_pacer(
            partial(CountedStore, redis_server.url, account),
            redis_server.url,
            request_rate=RATE,
            say=lambda _: None,
        )
        for _ in range(4)
    ]
    for pacer in pacers:
        pacer.account._pid = f"p{id(pacer)}"  # four processes, as the store sees them
    starts = await _starts(pacers, 4.0)
    per_second = Counter(int(at) for _, at in starts)
    # Each second holds the account's rate, no more (a lease's worth of slack), not 4x.
    for second in (1, 2, 3):
        assert RATE * 0.9 <= per_second[second] <= RATE + 4, per_second
    assert {i for i, _ in starts} == {0, 1, 2, 3}  # all of them got their turns
    # A call to the store serves a few starts, at a rate where a tenth of a second of each
    # process's share is one start: more than a call a start (167 calls for 157 starts).
    assert CountedStore.calls <= len(starts) / 2, (CountedStore.calls, len(starts))


async def test_a_call_that_tells_no_refusal_does_not_read_the_send_log(redis_server: RedisServer) -> None:
    """The script looked back over two seconds of the account's send log on every call (most of
    the store's CPU: 136 us a request at 16 shards); now only when a call tells of a refusal
    of a request sent after the last run of them it saw."""
    store = Store(redis_server.url, account_key("http://x/v1", FAKE_KEY))
    client: Any = redis.Redis.from_url(redis_server.url)

    async def reads() -> int:
        stats = await client.info("commandstats")
        return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))

    try:
        cs = int(time.time() * 100)
        for i in range(20):
            await store.call(Ask("a", want=1, found=100.0, log=f"{cs + i} 5 0 0 0"))
        told = await reads()
        assert told == 20  # the processes seen lately, once a call: no more
        await store.call(Ask("a", want=1, found=100.0, log=f"{cs + 20} 5 4 {cs + 100} 0"))
        assert await reads() > told + 1  # a refusal: the log is looked at for a run of them
        # A run whose room is past, then the rest of it told late: no new run to see there.
        late = Store(redis_server.url, account_key("http://y/v1", FAKE_KEY))
        await late.call(Ask("a", want=1, log=f"{cs - 50} 5 4 {cs - 10} 0"))
        scanned = await reads()
        await late.call(Ask("a", want=1, log=f"{cs - 49} 5 5 {cs - 10} 0"))
        await late.close()
        assert await reads() == scanned + 1  # the processes seen lately, no more
    finally:
        await store.close()
        await client.aclose()


class LogStore:
    """A store whose log is given: (hundredth sent, refused) of each request, each let through
    admitted when it was sent unless `admitted` says when (a hundredth each)."""

    def __init__(self, log: list[tuple[int, bool]], admitted: list[int] | None = None) -> None:
        self.log = log
        self.admitted = [cs for cs, refused in log if not refused] if admitted is None else admitted

    async def read(self, since: float, until: float) -> Logged:
        span = range(int(since * 100), int(until * 100))
        sent = [(cs, refused) for cs, refused in self.log if cs in span]
        got = sum(cs in span for cs in self.admitted)
        return Logged(len(sent), sum(refused for _, refused in sent), got)


async def test_a_reading_counts_what_got_through_after_the_first_moment_however_late_it_arrived() -> None:
    """A server that lets 100 requests a second through, by the second: full at 10.5 (the run
    begins with the request sent then), room at 11.0; full again at 11.5, room at 12.0. 40 of
    those it let through in its second 11 left a little before 11.0 (they arrived after it: a
    server that queues, or a machine that sends late): counted by send from 11.0, the limit
    came out at 60, not 100; by admission, 100."""
    log = [(1000 + i, False) for i in range(0, 50)]  # 10.00 to 10.49: 100 a second, let through
    log += [(1050 + i, True) for i in range(0, 10)]  # the run: refused
    log += [(1090 + i // 4, False) for i in range(40)]  # 10.90 to 10.99: arrive after 11.0
    log += [(1100 + i, False) for i in range(60)]  # 11.00 to 11.59
    log += [(1160 + i, True) for i in range(10)]  # full again
    admitted = [*range(1000, 1050), *(1100 + i // 4 for i in range(40)), *range(1100, 1160)]
    store: Any = LogStore(log, admitted)
    capacity = AccountCapacity()
    await capacity.read(store, Moment(10.50, 11.0))
    second = await capacity.read(store, Moment(11.60, 12.0))
    assert second is not None
    assert second[0] == pytest.approx(100.0)


async def test_a_later_reading_counts_what_was_sent_after_the_refused_one_and_got_through() -> None:
    """The same server, full at 10.5 and again at 11.94 (room at 11.0 and 12.0). Six requests
    sent just after the one refused at 11.94 reached it first (on busy cores, requests overtake
    one another), and were let through: the limit read up to the refused one came out at 94;
    up to the room the server told (the account paused till then), at 100."""
    log = [(1000 + i, False) for i in range(0, 50)]
    log += [(1050 + i, True) for i in range(0, 10)]
    log += [(1100 + i, False) for i in range(94)] + [(1194, True)]
    log += [(1195 + i // 2, False) for i in range(6)]  # overtook the refused one
    log += [(1195 + i // 2, True) for i in range(10)]
    store: Any = LogStore(log)
    capacity = AccountCapacity()
    await capacity.read(store, Moment(10.50, 11.0))
    second = await capacity.read(store, Moment(11.94, 12.0))
    assert second is not None
    assert second[0] == pytest.approx(100.0)


async def test_a_later_reading_is_not_held_down_by_a_stretch_sent_under_the_limit() -> None:
    """A server letting 100 a second through: full at 10.5 (room at 11.0); then the account
    sends 50 a second for four seconds (its pace read low, or its machine behind); full again at
    15.5 and 16.6. Read from the first moment, the limit came out at 67 a second, and paced at,
    lower at every moment after; read over the last second full, at 100."""
    log = [(1000 + i, False) for i in range(0, 50)] + [(1050 + i, True) for i in range(10)]
    log += [(1100 + i * 2, False) for i in range(200)]  # 11.00 to 14.98: 50 a second
    log += [(1500 + i // 2, False) for i in range(100)] + [(1550 + i, True) for i in range(10)]
    log += [(1600 + i * 6 // 10, False) for i in range(100)] + [(1660 + i, True) for i in range(10)]
    store: Any = LogStore(log)
    capacity = AccountCapacity()
    await capacity.read(store, Moment(10.50, 11.0))
    await capacity.read(store, Moment(15.50, 16.0))
    third = await capacity.read(store, Moment(16.60, 17.0))
    assert third is not None
    assert third[0] == pytest.approx(100.0, rel=0.05)


async def test_a_first_reading_counts_the_servers_second_not_the_second_before_the_refusal() -> None:
    """A server that lets 1,000 requests a second through, by the second, under a ramp: 500
    let through in its second 9, 1,000 in its second 10 by 10.74, when the first refused left;
    room at 11.0. The second before 10.74 read 1,130 (the end of second 9 with it); the
    server's second 10 reads 1,000."""
    log = [(900 + i // 5, False) for i in range(500)]
    log += [(1000 + i * 74 // 1000, False) for i in range(1000)]
    log += [(1074 + i // 20, True) for i in range(500)]
    store: Any = LogStore(log)
    first = await AccountCapacity().read(store, Moment(10.74, 11.0))
    assert first is not None
    assert first[0] == pytest.approx(1000.0)


async def test_a_first_reading_spans_the_whole_second_even_if_the_account_began_within_it() -> None:
    """40 let through a second, by the second, the account sending since second 9: none of
    second 10's left in its first hundredth. Read from its first send (10.01), over 0.79 s,
    the limit came out at 51, and eight shards paced into refusals for seconds (up to 27 of 600)."""
    log = [(900 + i * 5 // 2, False) for i in range(40)]
    log += [(1001 + i * 2, False) for i in range(40)]  # 10.01 to 10.79
    log += [(1080 + i, True) for i in range(10)]
    store: Any = LogStore(log)
    first = await AccountCapacity().read(store, Moment(10.80, 11.0))
    assert first is not None
    assert first[0] == pytest.approx(40.0)
    # An account that began within the second (a ramp from 64 a second fills a second of 40 in
    # its first): read from its first send, 40 in 0.46 s came out at 86 a second, and eight
    # shards paced at it filled the next second by its middle (19 refusals where 18 are allowed).
    store = LogStore(log[40:])
    began = await AccountCapacity().read(store, Moment(10.80, 11.0))
    assert began is not None
    assert began[0] == pytest.approx(40.0)


async def test_a_first_reading_with_its_room_a_second_away_counts_no_more_than_the_second_before() -> None:
    """A room told more than a second after the refused request left (a minute's window, or
    refusals read late on busy cores): the reading counted what was sent and let through up
    to a second after the refused one too, over one second. Sixteen shards on two busy cores
    read 1,639 a second where 1,000 were let through."""
    log = [(950 + i * 5 // 2, False) for i in range(40)]  # 9.50 to 10.47
    log += [(1050 + i, True) for i in range(10)]  # the run, from 10.50
    log += [(1060 + i * 3, False) for i in range(30)]  # let through in the server's next second
    store: Any = LogStore(log)
    first = await AccountCapacity().read(store, Moment(10.50, 11.9))
    assert first is not None
    assert first[0] == pytest.approx(40.0)


class Clock:
    """One fake clock for the store, the processes and their loops: time moves when told."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:  # as the loop's
        return self.now


class HeldStore:
    """An account's store held in this process (the Ray actor's rules), on the fake clock."""

    def __init__(self, clock: Clock) -> None:
        self.pace = AccountPace(boot_rate=BOOT_RATE, watch=WATCH, run=RUN, clock=clock)

    async def call(self, ask: Ask) -> Reply:
        return self.pace.call(ask)

    async def read(self, since: float, until: float) -> Logged:
        return self.pace.read(since, until)


class Budget:
    """What a link asks of its pace: a process holding leased starts, no limit given."""

    given = given_tokens = watch_until = 0.0
    holds, alone, booting = True, False, True

    def __init__(self, clock: Clock) -> None:
        self._now = clock

    def granted(self, r: Reply, offset: float, tokens: float) -> None:
        pass


class TwoProcesses:
    """Processes `a` and `b` of one account, linked to a store held here, on one fake clock."""

    def __init__(self) -> None:
        self.clock = Clock(9.0)
        self.store: Any = HeldStore(self.clock)
        self.links = {pid: StoreLink(lambda: self.store, "memory", lambda _: None) for pid in "ab"}
        for pid, link in self.links.items():
            link._pid, link.budget = pid, Budget(self.clock)  # type: ignore[assignment]

    async def sync(self, pid: str, at: float) -> None:
        """`pid` calls the store at `at`, and reads what it may."""
        self.clock.now = at
        link = self.links[pid]
        await link._sync(self.store, self.clock)
        log = link.account_log
        await link._readings.read(self.store, self.clock, alone=False, late=log.late, by_answer=log.by_answer)

    def admitted(self, pid: str, sent_at: float, at: float) -> None:
        """`pid`'s request sent at `sent_at` got through, its answer in at `at`."""
        self.clock.now = at
        self.links[pid].answered(sent_at)

    async def answer_and_sync(self, answers: list[tuple[float, float]], times: Iterable[float]) -> None:
        """At each of `times`, `a` takes the `answers` (answered at, sent at: in order) in by
        then, and both processes call the store."""
        for at in times:
            while answers and answers[0][0] <= at:
                self.admitted("a", answers[0][1], answers.pop(0)[0])
            await self.sync("a", at)
            await self.sync("b", at)

    async def full_at_9_60(self, latency: float = 0.0) -> None:
        """Both known to the store at 9.0 (its clock the same as ours); `a` gets 60 through
        in the server's second 9, then a run of refusals from 9.60, room told at 10.0. Its
        answers take `latency` (given here when 0; else the test's to give), its refusals none."""
        for pid in "ab":
            await self.sync(pid, 9.0)
        a = self.links["a"]
        for i in range(60):
            self.clock.now = 9.0 + i / 100
            a.sent(self.clock.now)
            if not latency:
                a.answered(self.clock.now)
        for i in range(RUN):
            self.clock.now = 9.6 + i / 100
            a.sent(self.clock.now)
            a.refused(self.clock.now, 10.0)


async def test_a_reading_counts_what_was_admitted_without_waiting_for_refusals_on_their_way() -> None:
    """A server letting 60 through in its second 9, full at 9.60 (room at 10.0). Process `b`
    sent 20 more before the room whose refusals come back half a second late (busy cores).
    Counted by send, the reading waited for their answers (else it took them for let
    through: 80), and was read at 10.5; counted by admission, they are not in it: 60, at 10.05."""
    account = TwoProcesses()
    read: list[tuple[str, float]] = []
    for pid, link in account.links.items():
        link.watch(partial(lambda pid, rate, sure: read.append((pid, rate)), pid))
    sync, b = account.sync, account.links["b"]
    await account.full_at_9_60()
    b.sent(8.99)
    account.admitted("b", 8.99, 9.0)  # its answers take 10 ms: it tells its admissions up to its call
    for i in range(20):  # sent before the room, refused: the answers are on their way
        b.sent(9.7 + i / 100)
    await sync("b", 10.05)
    await sync("a", 10.05)  # the account seen full at 9.60: read once the store holds 10.0
    await sync("b", 10.06)
    assert sorted(read) == [("a", pytest.approx(60.0)), ("b", pytest.approx(60.0))]


@pytest.mark.parametrize("spread", [0.0, 2.0, 28.0])
async def test_a_reading_with_answers_of_seconds_counts_what_the_servers_second_let_through(
    spread: float,
) -> None:
    """The same server answering in 2 s (2 to 4 s, 2 to 30 s), its refusals at once. Counted
    by admission, as its answer less the least latency tells, its second 9 let through 60
    (22, 2): answers that take seconds, more for some, tell little of when the request was
    admitted. Such a server is read by send, as before: 60 once the refusals are in."""
    account = TwoProcesses()
    read: list[float] = []
    account.links["a"].watch(lambda rate, sure: read.append(rate))
    latency = [2.0 + spread * ((i * 37) % 60) / 59 for i in range(60)]
    await account.full_at_9_60(latency=2.0)
    answers = sorted((9.0 + i / 100 + latency[i], 9.0 + i / 100) for i in range(60))
    await account.answer_and_sync(answers, (10.05, 10.5, 11.0, 11.05, 11.5, 12.0, 13.0, 31.0))
    assert read == [pytest.approx(60.0)]


async def test_a_few_quick_answers_among_answers_of_seconds_do_not_make_the_reading_by_admission() -> None:
    """The same server answering one request in ten in 0.1 s (a short completion), the others
    in 2 to 30 s, its refusals at once. Its quickest answer within FAST made the account's
    reading by admission, as its answer less 0.1 s tells: read once the quick answers were in,
    its second 9 let through 6 where 60 got through, and the account was paced at 6 a second.
    Most of its answers still out, it is read by send: 60."""
    account = TwoProcesses()
    read: list[float] = []
    account.links["a"].watch(lambda rate, sure: read.append(rate))
    latency = [0.1 if i % 10 == 0 else 2.0 + 28.0 * ((i * 37) % 60) / 59 for i in range(60)]
    await account.full_at_9_60(latency=2.0)
    answers = sorted((9.0 + i / 100 + latency[i], 9.0 + i / 100) for i in range(60))
    await account.answer_and_sync(answers, (10.05, 10.1, 10.15, 10.5, 11.0, 11.05, 11.5, 12.0, 13.0, 31.0))
    assert read == [pytest.approx(60.0)]


async def test_a_model_that_slows_from_20_ms_to_5_s_is_read_by_send_at_once() -> None:
    """Answers in 20 ms for four seconds, then in 5 s (the least latency lately still 20 ms,
    for up to two spans): read by admission, as its answer less 20 ms tells, the second its
    server let 60 through read 0, none of their answers in. Its refusals come back with those
    60 out: read by send, 60."""
    account = TwoProcesses()
    read: list[float] = []
    account.links["a"].watch(lambda rate, sure: read.append(rate))
    a = account.links["a"]
    await account.sync("b", 5.0)
    for i in range(240):  # 60 a second from 5.0, in 20 ms
        a.sent(5.0 + i / 60)
        account.admitted("a", 5.0 + i / 60, 5.02 + i / 60)
        if i % 6 == 0:
            await account.sync("a", 5.02 + i / 60)
    await account.full_at_9_60(latency=5.0)
    answers = [(9.0 + i / 100 + 5.0, 9.0 + i / 100) for i in range(60)]
    await account.answer_and_sync(answers, (9.65, 10.05, 10.1, 10.5, 11.0, 11.05, 12.0, 14.5, 15.0))
    assert read == [pytest.approx(60.0)]


async def test_a_process_that_dies_with_requests_out_holds_a_reading_no_longer_than_read_wait() -> None:
    """`b` dies with 20 requests out, sent before the moment the account was full and none of
    its answers known: its last call's log of admissions, whole up to its oldest request out,
    holds the store's `reported` back for as long as it counts as a member (5 s), but a reading
    waits READ_WAIT at most (past the least latency of answers), whole or not."""
    account = TwoProcesses()
    read: list[float] = []
    account.links["a"].watch(lambda rate, sure: read.append(rate))
    sync, b = account.sync, account.links["b"]
    await account.full_at_9_60()
    for i in range(20):
        b.sent(9.7 + i / 100)
    await sync("b", 10.05)  # its last call
    await sync("a", 10.06)  # the account seen full: a reading waits for b's log
    for at in (10.5, 11.0):
        await sync("a", at)
    assert read == []
    await sync("a", 10.06 + READ_WAIT)
    assert read == [pytest.approx(60.0)]  # b's 20, never answered, not admitted


@pytest.mark.parametrize("end", ["a 200", "a 400", "a 500", "a 503 refusal"])
async def test_a_request_with_an_answer_of_any_kind_holds_no_reading(end: str) -> None:
    """A reading of the account's limit waits for the admissions of every process up to its
    moment (Ask.whole): a request whose answer is in, let through or not, is not one to wait
    for. A 400 (a line at fault) or a 500 held every reading for READ_WAIT, a second; a 503
    refusal, told twice, would let go of another request sent in its hundredth."""
    clock = Clock(9.0)
    pacer = shared_pacer(lambda: Store("redis://127.0.0.1:1", "unused"), "a store")
    finder = RateFinder(pacer, Window(64), clock=clock)
    log = pacer.account.account_log  # type: ignore[union-attr]
    log.offset = 0.0  # the store's clock known (the same as ours)
    pacer._loop = clock  # type: ignore[assignment]
    ticket, other = finder.sent(), finder.sent()
    clock.now = 9.1
    if end == "a 200":
        finder.success(ticket, 0.1)
    elif end == "a 400":
        finder.answered(ticket)
    elif end == "a 500":
        finder.failure(ticket, "500 Internal Server Error")
    else:  # as the gate tells it: a refusal, and the endpoint's failure
        finder.pushback(ticket, 1.0, "503 overloaded")
        finder.failure(ticket, "503 overloaded")
    assert log.whole(9.1, READ_WAIT) == 9.0  # the other is out: its admission may be logged from 9.0 on
    clock.now = 9.2
    finder.success(other, 0.2)
    assert log.whole(9.2, READ_WAIT) == -1.0


async def test_the_ramp_doubles_on_the_answers_to_what_was_sent_at_its_rate() -> None:
    """The ramp grows once its requests are let through at 3/4 of its rate: counted with
    them, answers to requests sent before its last step (late on busy cores) let it double
    again before that step was answered, and in a model of sixteen processes 0.1 s behind it
    went twice as far past the limit."""
    account = TwoProcesses()
    asks: list[Ask] = []
    call = account.store.call
    account.store.call = lambda ask: asks.append(ask) or call(ask)
    await account.sync("a", 9.0)  # the ramp's first rate told
    account.store.pace.fields["boot"] = 128.0  # it grew
    await account.sync("a", 9.3)
    a = account.links["a"]
    for sent_at in (9.2, 9.31):
        a.sent(sent_at)
        account.admitted("a", sent_at, 9.36)
    await account.sync("a", 9.4)
    assert asks[-1].answered == 1  # the one sent at its new rate


def test_a_request_whose_end_is_never_told_holds_no_reading_for_long() -> None:
    """A refusal another scope reads is never told to the account's log. Read by admission,
    the log is whole up to its call less the least latency whatever is out; the request is
    let go after STALE (the log of requests out kept it, and grew, for as long as the run went).
    Before any answer, a reading is by send: up to the oldest request out within READ_WAIT."""
    log = AccountLog()
    log.offset = 0.0
    log.sent(9.0)
    assert log.whole(9.5, READ_WAIT) == 9.0
    assert log.whole(10.5, READ_WAIT) == -1.0  # older than READ_WAIT: no refusal on its way
    log.sent(10.5)
    log.sent(10.6)
    log.admitted(10.6, 10.62)  # the server answers in 20 ms: read by admission
    assert log.whole(11.0, READ_WAIT) == pytest.approx(10.98)
    assert log.whole(10.5 + STALE - 1.0, READ_WAIT) == pytest.approx(9.48 + STALE)
    assert log.whole(10.5 + STALE + 1.0, READ_WAIT) == -1.0


async def test_the_key_names_the_account_by_a_hash_never_the_key(redis_server: RedisServer) -> None:
    account = account_key("http://x/v1", FAKE_KEY)
    assert FAKE_KEY not in account
    pacer = shared_pacer(
        partial(Store, redis_server.url, account), redis_server.url, request_rate=RATE, say=lambda _: None
    )
    await _starts([pacer], 0.5)
    client: Any = redis.Redis.from_url(redis_server.url)
    try:
        keys = [k.decode() for k in await client.keys("*")]
        assert keys
        assert all(k.startswith(account) for k in keys)
        for key in keys:
            ttl = await client.ttl(key)
            assert 0 < ttl <= 600  # expires when unused
            dump = str(await client.hgetall(key))
            assert FAKE_KEY not in dump
    finally:
        await client.aclose()


async def _through_an_outage(pacers: list[Pacer], store: RedisServer) -> Counter[int]:
    """Starts a second, every pacer acquiring as fast as it may for 6 s, the store away from
    1.5 s to 3.5 s."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    seen: list[float] = []

    async def spend(pacer: Pacer) -> None:
        while loop.time() - began < 6:
            await pacer.acquire()
            seen.append(loop.time() - began)
            await asyncio.sleep(0)

    async def outage() -> None:
        await anyio.sleep(1.5)
        store.stop()
        await anyio.sleep(2.0)
        store.start()

    try:
        async with anyio.create_task_group() as tg:
            for pacer in pacers:
                tg.start_soon(pacer.run)
            tg.start_soon(outage)
            with anyio.move_on_after(7):
                async with anyio.create_task_group() as spenders:
                    for pacer in pacers:
                        spenders.start_soon(spend, pacer)
            tg.cancel_scope.cancel()
    finally:
        store.stop()
    return Counter(int(at) for at in seen if at < 6)


async def test_a_process_that_joins_keeps_the_limit_the_account_found(redis_server: RedisServer) -> None:
    # A shard started late (or again, after its node died) published "none found" on its
    # first call: the account's limit was forgotten and every process ramped up again.
    account = account_key("http://x/v1", FAKE_KEY)
    store = Store(redis_server.url, account)
    try:
        await store.call(Ask("found-it", found=RATE))
        joining = shared_pacer(
            partial(Store, redis_server.url, account), redis_server.url, say=lambda _: None
        )
        assert len(await _starts([joining], 0.5)) >= RATE * 0.5 * 0.8
        after = await store.call(Ask("found-it"))
    finally:
        await store.close()
    assert (after.rate, after.booting) == (RATE, False)


async def test_a_store_that_goes_away_leaves_each_process_its_share(tmp_path: Path) -> None:
    store = RedisServer(tmp_path / "redis")
    store.start()
    said: list[str] = []
    account = account_key("http://x/v1", FAKE_KEY)
    pacers = [
        shared_pacer(partial(Store, store.url, account), store.url, request_rate=RATE, say=said.append)
        for _ in range(2)
    ]
    for i, pacer in enumerate(pacers):
        pacer.account._pid = f"p{i}"
    per_second = await _through_an_outage(pacers, store)
    for second in range(1, 6):
        assert per_second[second] <= RATE + 6, per_second  # the limit held, store or not
    assert per_second[2] >= RATE * 0.7  # alone, each at its share: the pace goes on
    assert per_second[5] >= RATE * 0.7  # together again
    assert sum("cannot be reached" in s for s in said) == 2  # each said so once
    assert sum("is back; pacing together" in s for s in said) == 2
    assert all(store.password is None or store.password not in s for s in said)


async def test_alone_a_shard_takes_its_share_of_the_jobs_shards_not_of_those_the_store_saw(
    tmp_path: Path,
) -> None:
    # A store just restarted has seen only the shard that came back first: alone again, that
    # shard must not take the whole account's rate while the job's other shards take theirs.
    store = RedisServer(tmp_path / "redis")
    store.start()
    said: list[str] = []
    pacer = shared_pacer(
        partial(Store, store.url, account_key("http://x/v1", FAKE_KEY)),
        store.url,
        request_rate=RATE,
        processes=4,
        say=said.append,
    )
    per_second = await _through_an_outage([pacer], store)
    assert per_second[2] <= RATE / 4 + 2, per_second  # away: a quarter, one shard of four
    assert per_second[3] <= RATE / 4 + 2, per_second
    assert per_second[5] >= RATE * 0.9, per_second  # back, and the only one: the whole rate
    assert "(600 requests a minute of 2,400)" in said[0]


async def test_shards_share_the_accounts_limit_end_to_end(
    mock, redis_server: RedisServer, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(480))
    out = tmp_path / "out"
    async with mock(rpm=RATE * 60, latency=0.02) as (url, server):
        procs = [
            await start(
                url,
                src,
                out,
                "--shard",
                f"{k}/4",
                "--shared-limit",
                redis_server.url,
                "--rpm",
                f"{RATE * 60:g}",
            )
            for k in range(1, 5)
        ]
        results = [await proc.communicate() for proc in procs]
        accepted = dict(server.state.accepted_per_second)
        refused = sum(server.state.refused_per_second.values())
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], [r[1][-300:] for r in results]
    assert sum(len(read_jsonl(out / f"shard-{k}-of-4/results.jsonl")) for k in range(1, 5)) == 480
    assert refused <= 480 * 0.005
    assert max(accepted.values()) <= RATE  # the mock counts by wall-clock second
    steady = sorted(accepted.values())[1:-1]
    assert sum(steady) / len(steady) >= RATE * 0.9  # together near the account's rate, not a quarter


@pytest.mark.alone  # eight processes and a store on two cores: on a busy machine it reads its load
async def test_eight_shards_find_an_unstated_limit_together(
    mock, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Each process sends an eighth of the account's requests: read from its own and scaled
    by its share, the limit came out anywhere from 65 to 97 % of the account's; read from the
    account's send log, at 97 % every time."""
    src = write_jsonl(tmp_path / "in.jsonl", bodies(600))
    out = tmp_path / "out"
    async with mock(rpm=RATE * 60, latency=0.02) as (url, server):
        procs = [
            await start(url, src, out, "--shard", f"{k}/8", "--shared-limit", redis_server.url)
            for k in range(1, 9)
        ]
        results = [await proc.communicate() for proc in procs]
        accepted = dict(server.state.accepted_per_second)
        refused = sum(server.state.refused_per_second.values())
    assert [proc.returncode for proc in procs] == [0] * 8, [r[1][-300:] for r in results]
    assert sum(len(read_jsonl(out / f"shard-{k}-of-8/results.jsonl")) for k in range(1, 9)) == 600
    assert refused <= 600 * 0.03  # the account's server seen full at once, not by each process
    steady = [accepted[s] for s in sorted(accepted)][2:-2]  # past the ramp and the stragglers
    assert sum(steady) / len(steady) >= RATE * 0.93, accepted  # at 97 % of the limit, less jitter


async def test_a_password_in_the_store_url_is_never_shown(mock, tmp_path: Path) -> None:
    store = RedisServer(tmp_path / "redis", password="s3cret-store-pw")
    store.start()
    try:
        src = write_jsonl(tmp_path / "in.jsonl", bodies(20))
        async with mock() as (url, _):
            proc = await start(url, src, tmp_path / "out", "--shared-limit", store.url)
            out, err = await proc.communicate()
            assert proc.returncode == 0, err
            wrong = store.url.replace(str(store.port), str(store.port + 1))
            proc = await start(url, src, tmp_path / "out2", "--shared-limit", wrong)
            out2, err2 = await proc.communicate()
    finally:
        store.stop()
    assert proc.returncode == 2
    assert b"cannot reach the shared limit's store" in err2
    text = out + err + out2 + err2
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            text += path.read_bytes()
    assert b"s3cret-store-pw" not in text
    assert b"***" in err2


def test_a_shared_limit_must_be_a_redis_url() -> None:
    with pytest.raises(SettingsError, match="not a redis:// URL"):
        pipeline.settings_from(None, input="x.jsonl", shared_limit="http://user:pw@host/0")
    with pytest.raises(SettingsError) as caught:
        pipeline.settings_from(None, input="x.jsonl", shared_limit="memcache://user:pw@host/0")
    assert "pw" not in str(caught.value).replace("memcache", "")


async def test_shards_through_a_store_outage_lose_nothing_and_hold_the_limit(mock, tmp_path: Path) -> None:
    store = RedisServer(tmp_path / "redis")
    store.start()
    src = write_jsonl(tmp_path / "in.jsonl", bodies(400))
    out = tmp_path / "out"

    async def outage() -> None:
        await anyio.sleep(3.0)
        store.stop()
        await anyio.sleep(3.0)
        store.start()  # the same port: the processes rejoin

    try:
        async with mock(rpm=RATE * 60, latency=0.02) as (url, server):
            procs = [
                await start(
                    url, src, out, "--shard", f"{k}/4", "--shared-limit", store.url, "--rpm", f"{RATE * 60:g}"
                )
                for k in range(1, 5)
            ]
            async with anyio.create_task_group() as tg:
                tg.start_soon(outage)
                results = [await proc.communicate() for proc in procs]
            accepted = dict(server.state.accepted_per_second)
            refused_by_second = dict(server.state.refused_per_second)
            refused = sum(refused_by_second.values())
    finally:
        store.stop()
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0]
    said = b"".join(err for _, err in results) + b"".join(o for o, _ in results)
    assert said.count(b"cannot be reached") >= 1  # the processes that met the outage said so
    merged = merge_ids(out)
    assert sorted(merged) == sorted(f"job-{i}" for i in range(400))  # nothing lost, nothing twice
    assert max(accepted.values()) <= RATE  # the mock counts by wall-clock second
    # A refusal or two a process at each switch (alone, then together) at most: the starts
    # in hand when the store went, or the last ones made alone when it came back.
    assert refused <= 2 * 4 * 2, (accepted, dict(refused_by_second))


def merge_ids(out: Path) -> list[str]:
    from pipeline.output.merge import merge

    merge(out)
    return [r["custom_id"] for r in read_jsonl(out / "results.jsonl")]


# -- one token limit --------------------------------------------------------------------------

TOKENS = 4000.0  # tokens a second the server allows (240,000 a minute), counted on arrival:
CHARGE = 50  # a 10-token prompt and max_tokens 40 (answers use less): 80 requests a second


def token_bodies(n: int) -> list[dict[str, Any]]:
    """Requests the server charges CHARGE tokens each, as pipeline estimates them."""
    return [
        {
            "custom_id": f"job-{i}",
            "model": "test/model",
            "max_tokens": CHARGE - 10,
            "messages": [{"role": "user", "content": f"question {i:03d}"}],
        }
        for i in range(n)
    ]


def token_share(accepted: dict[int, int]) -> float:
    """The share of the token limit the server counted a second (it counts by wall-clock
    second), past the first (the processes start) and before the last."""
    seconds = [accepted[s] for s in sorted(accepted)][1:-1]
    return sum(seconds) * CHARGE / len(seconds) / TOKENS


def test_leased_tokens_go_at_the_accounts_rate_and_late_ones_are_gone() -> None:
    leases = TokenLeases()
    leases.rate = 100.0  # the account's tokens a second
    assert leases.ready_at(50, 10.0) is None  # none in hand: ask the store
    leases.add(10.0, 80)  # the account's tokens of 10.0 to 10.8...
    leases.add(11.0, 80)  # ...and of 11.0 to 11.8 (another process has those between)
    leases.take(50, 10.0)
    # 30 left of the first, 20 of the second: 20 that are not due before 11.0
    assert leases.ready_at(50, 10.0) == pytest.approx(10.7)
    leases.take(50, 10.7)
    assert leases.held == pytest.approx(60)
    assert leases.ready_at(50, 11.25) == pytest.approx(11.2)
    # Unused, a lease's tokens are gone LATE after their time: spent then, they would add
    # to the stretch of another process.
    assert leases.ready_at(50, 11.8) is None  # 10 left: those of 11.7 to 11.8
    assert leases.held == pytest.approx(10)
    assert leases.ready_at(10, 11.9) is None
    leases.give_back(50, 12.0)  # a request never sent
    assert leases.ready_at(50, 12.0) == 12.0
    leases.charge(70)  # an answer that used 70 more than it reserved: 20 owed
    assert leases.ready_at(1, 12.0) is None
    leases.add(12.2, 100)
    assert leases.held == pytest.approx(80)
    assert leases.ready_at(80, 12.2) == pytest.approx(12.4)  # the owed 20 came first


@pytest.mark.alone  # four processes measured against a token limit: beside another test, it reads its load
@pytest.mark.parametrize("stated", ["--tpm", "headers"])
async def test_four_shards_hold_one_token_limit_counted_on_arrival(
    mock, redis_server: RedisServer, tmp_path: Path, stated: str
) -> None:
    """The token limit given (--tpm), or stated only in x-ratelimit-* headers, is the
    account's: leased as starts are. The shared pace zeroed its token rate (and ignored one
    stated), so nothing reserved tokens: 2 to 5 % answered 429."""
    n = 400
    src = write_jsonl(tmp_path / "in.jsonl", token_bodies(n))
    out = tmp_path / "out"
    given = ["--tpm", f"{TOKENS * 60:g}"] if stated == "--tpm" else []
    headers = stated == "headers"
    async with mock(tpm=TOKENS * 60, tpm_count="arrival", ratelimit_headers=headers, latency=0.02) as (
        url,
        server,
    ):
        procs = [
            await start(url, src, out, "--shard", f"{k}/4", "--shared-limit", redis_server.url, *given)
            for k in range(1, 5)
        ]
        results = [await proc.communicate() for proc in procs]
        accepted = dict(server.state.accepted_per_second)
        refused = sum(server.state.refused_per_second.values())
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], [r[1][-300:] for r in results]
    assert sorted(merge_ids(out)) == sorted(f"job-{i}" for i in range(n))  # exactly once
    assert refused <= n * 0.005, (refused, accepted)
    # Both halves of a limit held: none over it (the refusals above), and the tokens not reserved
    # twice nor leased away (each would leave half of it, or less). The 95 % target is the
    # bench's (shards, 4-tpm-3000): over this run's four counted seconds, four processes beside
    # the mock and Redis on two cores read 0.87 to 0.93 once in four to eight runs on every tree
    # since 8427e57 (a leased token not spent within LATE of its time is gone), at load 1 to 10.
    assert token_share(accepted) >= 0.85, accepted


class CountingStore:
    """A store that grants at most ten starts a call, at the account's clock, and notes how
    many were asked for."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    async def check(self) -> None:
        pass

    async def call(self, ask: Ask) -> Reply:
        self.asked.append(ask.want)
        now = asyncio.get_running_loop().time()
        granted = min(ask.want, 10)
        return Reply(now, ask.given, now if granted else -1, -1, 0.0, 1, True, False, -1, -1, granted)

    async def read(self, since: float, until: float) -> Logged:
        return Logged(0, 0, 0)

    async def close(self) -> None:
        pass


@pytest.mark.parametrize("rpm", [1e15, 9223372036854775807.0])
async def test_a_rate_far_past_any_server_leases_no_more_than_a_tenth_of_a_second_of_the_ramps_top(
    rpm: float,
) -> None:
    # --rpm 1e15 (or a gateway's "unlimited" stated as 2**63 - 1): a lease of a tenth of a
    # second of it was 10**16 starts, a float each, asked for at once: gigabytes in seconds.
    store = CountingStore()
    pacer = shared_pacer(lambda: store, "memory", request_rate=rpm / 60, say=lambda _: None)
    async with anyio.create_task_group() as tg:
        tg.start_soon(pacer.run)
        with anyio.fail_after(5):
            for _ in range(50):
                await pacer.acquire()
        tg.cancel_scope.cancel()
    assert store.asked
    assert max(store.asked) <= MAX_LEASE


async def test_a_process_asks_for_its_next_lease_only_while_requests_wait_for_it() -> None:
    """A process asked for the next lease as the one in hand ran low, whether or not a request
    waited: a shard ended holding the lease it asked for after its last request, lost to the
    others (eight shards ending one by one sent 30 a second in their last seconds, of 39)."""
    store = CountingStore()
    pacer = shared_pacer(lambda: store, "memory", request_rate=RATE, say=lambda _: None)
    assert pacer.account is not None
    async with anyio.create_task_group() as tg:
        tg.start_soon(pacer.run)
        with anyio.fail_after(5):
            for _ in range(3):  # of a lease of four, one by one: one left, and nobody waits
                await pacer.acquire()
        assert pacer.account._want == 0  # the next request asks, if one comes
        assert [want for want in store.asked if want] == [4]
        tg.cancel_scope.cancel()


@pytest.mark.parametrize("said", ["2147483647", "9223372036854775807", "1e308"])
def test_a_limit_stated_as_unlimited_is_no_limit(said: str) -> None:
    assert per_minute(said) is None
    assert per_minute(f"{said}, 500") == 500


async def test_at_the_end_of_a_pause_no_waiter_goes_without_a_leased_start() -> None:
    """Within the timer's slack of a pause's end (uvloop's timers fire up to a millisecond
    early), the end was read as a start: every waiter went at once, none leased (150 to 200
    refusals at 4 shards and 3,000 a minute)."""
    store = CountingStore()
    pacer = shared_pacer(lambda: store, "memory", request_rate=40.0, say=lambda _: None)
    now = pacer._now()
    pacer.account.account_log.offset = 0.0
    pacer._paused_until = now + 0.0005  # the pause ends within the slack
    waiters = [asyncio.ensure_future(pacer.acquire()) for _ in range(5)]
    await asyncio.sleep(0)
    pacer._release()  # the timer, fired a little early
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiters)  # they wait for their leases
    for w in waiters:
        w.cancel()
    await asyncio.gather(*waiters, return_exceptions=True)
