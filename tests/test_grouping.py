"""Lines that share a long prefix sent close together (issue 23, point 3): a prefix's first
line alone, the rest once its answer is in, a few prefixes taking turns; lines without a long
prefix never held; every request given out exactly once, whatever the order of answers."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline
from pipeline.input.prefix import MIN_TOKENS, group_key, prefix_key
from pipeline.job import Request
from pipeline.run.grouping import Grouping
from tests.conftest import read_jsonl

SYSTEM = "You label tickets. " + "x" * (4 * MIN_TOKENS)


def _request(n: int, key: str | None) -> Request:
    return Request(f"r{n}", n, b"{}", prefix=key)


class Pool:
    """The workers' side, in-process: what was handed out, in order."""

    def __init__(self, grouping: Grouping, *, waiting: int = 0) -> None:
        self.grouping = grouping
        self.waiting = waiting  # workers waiting on the buffer (`offer` succeeds for so many)
        self.given: list[Request] = []
        grouping.offer = self._offer
        grouping.idle = lambda: self.waiting

    def _offer(self, request: Request) -> bool:
        if not self.waiting:
            return False
        self.waiting -= 1
        self.given.append(request)
        return True

    def add(self, request: Request) -> None:
        self.grouping.add(request)

    def take_all(self) -> list[Request]:
        while self.grouping.ready:
            self.given.append(self.grouping.take())
        return self.given


def test_a_prefix_first_line_goes_alone_and_the_rest_once_its_answer_is_in() -> None:
    grouping = Grouping(most=100, max_bytes=10**6)
    pool = Pool(grouping)
    a, b, c = (_request(n, "k") for n in range(3))
    for request in (a, b, c):
        pool.add(request)
    assert pool.take_all() == [a]  # b and c wait for a's answer
    assert grouping.held == 2
    grouping.done(a, failed=False)
    assert pool.take_all() == [a, b, c]
    assert grouping.held == 0


def test_a_failed_leader_has_the_next_line_lead_alone() -> None:
    grouping = Grouping(most=100, max_bytes=10**6)
    pool = Pool(grouping)
    a, b, c = (_request(n, "k") for n in range(3))
    for request in (a, b, c):
        pool.add(request)
    assert pool.take_all() == [a]
    grouping.done(a, failed=True)
    assert pool.take_all() == [a, b]  # b leads in a's stead; c still waits
    grouping.done(b, failed=False)
    assert pool.take_all() == [a, b, c]


def test_a_prefix_whose_leaders_keep_failing_has_its_lines_go_together_not_one_at_a_time() -> None:
    # (A parameter its model refuses: every line fails alike. One at a time, 100 lines at
    # 20 ms took 3.6 s with 8 workers, a job of 10,000 at real latencies, a day.)
    grouping = Grouping(most=100, max_bytes=10**6)
    pool = Pool(grouping)
    lines = [_request(n, "k") for n in range(10)]
    for request in lines:
        pool.add(request)
    assert pool.take_all() == lines[:1]
    grouping.done(lines[0], failed=True)
    assert pool.take_all() == lines[:2]  # one failure may be the line's own: the next leads
    grouping.done(lines[1], failed=True)
    assert pool.take_all() == lines  # two in a row: the rest go, as they would have
    for request in lines[2:-1]:
        grouping.done(request, failed=True)
    others = [_request(n, f"other{n}") for n in range(3)]  # answered since: k's turn is not recent
    for request in others:
        pool.add(request)
        grouping.done(request, failed=False)
    later = [_request(n, "k") for n in range(10, 14)]
    for request in later:
        pool.add(request)
    assert pool.take_all() == lines + others + later  # its next turn needs no leader either


def test_a_leader_answered_from_the_answer_cache_has_the_next_line_lead_alone() -> None:
    grouping = Grouping(most=100, max_bytes=10**6)
    pool = Pool(grouping)
    lines = [_request(n, "k") for n in range(4)]
    for request in lines:
        pool.add(request)
    assert pool.take_all() == lines[:1]
    grouping.done(lines[0], failed=False, reused=True)  # never sent: the provider has no prefix
    assert pool.take_all() == lines[:2]
    grouping.done(lines[1], failed=False)
    assert pool.take_all() == lines


def test_lines_released_go_straight_to_workers_waiting() -> None:
    grouping = Grouping(most=100, max_bytes=10**6)
    pool = Pool(grouping)
    a, b, c = (_request(n, "k") for n in range(3))
    for request in (a, b, c):
        pool.add(request)
    assert pool.take_all() == [a]
    pool.waiting = 1
    grouping.done(a, failed=False)
    assert pool.given == [a, b]
    assert list(grouping.ready) == [c]


def test_a_few_prefixes_take_turns_the_others_wait_and_lead_again() -> None:
    grouping = Grouping(most=100, max_bytes=10**6, most_open=2, most_open_idle=2)
    pool = Pool(grouping)
    keys = [str(k) for k in range(4)]
    lines = {key: [_request(10 * k + i, key) for i in range(3)] for k, key in enumerate(keys)}
    for i in range(3):
        for key in keys:
            pool.add(lines[key][i])
    first = [lines[key][0] for key in keys]
    assert pool.take_all() == first  # each prefix's first line, alone
    for request in first:
        grouping.done(request, failed=False)
    # Two prefixes take a turn (the first two answered): their lines go; keys 2 and 3 wait.
    assert {r.prefix for r in grouping.ready} == {keys[0], keys[1]}
    assert len(grouping.ready) == 4
    assert grouping.held == 4
    assert not grouping.more()  # two turns at most, even with workers idle
    # Once a turn's lines are taken, the next prefix's turn: 2 and 3 were answered last (so
    # most likely still cached), and go without a leader.
    assert [r.prefix for r in pool.take_all()[8:]] == [keys[2], keys[2], keys[3], keys[3]]
    assert grouping.held == 0


def test_a_turn_ends_when_its_lines_are_taken_and_the_next_prefix_begins() -> None:
    grouping = Grouping(most=100, max_bytes=10**6, most_open=1, most_open_idle=1)
    pool = Pool(grouping)
    a = [_request(i, "a") for i in range(3)]
    b = [_request(10 + i, "b") for i in range(3)]
    for request in (a[0], b[0], a[1], a[2], b[1], b[2]):
        pool.add(request)
    assert pool.take_all() == [a[0], b[0]]
    grouping.done(b[0], failed=False)  # b answers first: its turn
    grouping.done(a[0], failed=False)  # a waits: one turn at a time
    assert list(grouping.ready) == [b[1], b[2]]
    assert grouping.held == 2
    # b's turn is over once its lines are taken; then a's, whose line was answered last (so
    # its prefix is most likely still cached): no leader
    assert pool.take_all()[2:] == [b[1], b[2], a[1], a[2]]
    assert grouping.held == 0


def test_a_prefix_answered_long_ago_leads_again_alone() -> None:
    grouping = Grouping(most=100, max_bytes=10**6, most_open=1, most_open_idle=1)
    pool = Pool(grouping)
    old, new = [_request(i, "old") for i in range(3)], [_request(10 + i, "new") for i in range(2)]
    others = [_request(20 + i, str(i)) for i in range(3)]
    for request in (old[0], new[0], old[1], old[2], new[1], *others):
        pool.add(request)
    grouping.done(old[0], failed=False)  # old: its turn, but ...
    pool.take_all()
    for request in (new[0], *others):  # ... four others answered since
        grouping.done(request, failed=False)
    del pool.given[:]
    grouping.done(old[1], failed=False)
    grouping.done(old[2], failed=False)
    assert pool.take_all() == [new[1]]


def test_the_next_prefix_leads_while_the_lines_of_a_turn_run_short_not_once_they_are_taken() -> None:
    # Workers take `ahead` lines in a leader's round trip: with fewer than that left to take,
    # the next prefix's leader goes now, so that its answer is in when they are taken (else
    # the workers wait for it, or take its held lines cold).
    grouping = Grouping(most=100, max_bytes=10**6, most_open=1, most_open_idle=2, ahead=2)
    pool = Pool(grouping)
    a, b = [_request(i, "a") for i in range(4)], [_request(10 + i, "b") for i in range(3)]
    for request in (a[0], b[0], a[1], a[2], a[3], b[1], b[2]):
        pool.add(request)
    assert pool.take_all() == [a[0], b[0]]
    grouping.done(a[0], failed=False)  # a's turn: its three lines go
    grouping.done(b[0], failed=False)  # b waits for a turn
    assert grouping.take() is a[1]
    grouping.done(a[1], failed=False)  # (a answered last: b's prefix may be gone, b leads again)
    assert grouping.take() is a[2]
    # One line of a's turn left to take: b's leader goes before it, not after.
    assert list(grouping.ready) == [b[1], a[3]]
    assert grouping.held == 1
    assert [grouping.take(), grouping.take()] == [b[1], a[3]]
    assert not grouping.ready  # b's other line waits for its leader's answer
    grouping.done(b[1], failed=False)
    assert list(grouping.ready) == [b[2]]


async def test_the_end_of_the_input_waits_for_every_held_line_to_go() -> None:
    grouping = Grouping(most=100, max_bytes=10**6)
    pool = Pool(grouping)
    a, b = _request(0, "k"), _request(1, "k")
    pool.add(a)
    pool.add(b)
    drained = asyncio.ensure_future(grouping.drain())
    await asyncio.sleep(0)
    assert not drained.done()
    grouping.done(a, failed=False)
    await drained
    assert pool.take_all() == [a, b]


async def test_a_full_hold_has_the_reader_wait_for_room_and_stopping_ends_the_wait() -> None:
    grouping = Grouping(most=2, max_bytes=10**6)
    pool = Pool(grouping)
    lines = [_request(n, "k") for n in range(3)]
    for request in lines:
        pool.add(request)
    assert grouping.full(2)
    room = asyncio.ensure_future(grouping.room(2))
    await asyncio.sleep(0)
    assert not room.done()
    grouping.done(lines[0], failed=False)
    assert pool.take_all() == lines  # (lines released and not yet taken count as held)
    await room
    grouping.add(_request(5, "z"))
    grouping.add(_request(6, "z"))
    waiting = asyncio.ensure_future(grouping.drain())
    await asyncio.sleep(0)
    grouping.stop()  # the run stopped: the held line stays to do
    await waiting
    assert grouping.held == 1


async def test_a_reader_that_found_the_hold_full_goes_on_once_an_eighth_is_free_not_at_each_line() -> None:
    # (Woken at each line taken to read one more, the reader cost more CPU than grouping saved
    # wall time at 20 ms.)
    grouping = Grouping(most=16, max_bytes=10**6)
    pool = Pool(grouping)
    for n in range(16):
        pool.add(_request(n, f"k{n}"))  # each its own prefix's first line: in `ready`
    assert grouping.full(2)
    room = asyncio.ensure_future(grouping.room(2))
    await asyncio.sleep(0)
    grouping.take()
    await asyncio.sleep(0)
    assert not room.done()  # room for one line: not yet
    grouping.take()
    await asyncio.sleep(0)
    assert room.done()  # 14 of 16 kept: an eighth free


def test_where_leaders_answer_soon_a_worker_waits_for_one_rather_than_send_a_line_cold() -> None:
    # (Answers in 20 ms: a line sent cold writes its prefix in one of the provider's few places,
    # pushing out a prefix whose lines are on their way; waiting for the leader costs a moment.)
    grouping = Grouping(
        most=100, max_bytes=10**6, most_open=1, most_open_idle=1, ahead=16, clock=_clock(0.01)
    )
    pool = Pool(grouping)
    lines = {key: [_request(10 * k + i, key) for i in range(3)] for k, key in enumerate("abc")}
    for i in range(3):
        for key in "abc":
            pool.add(lines[key][i])
    assert pool.take_all() == [lines[key][0] for key in "abc"]  # the leaders, in flight
    grouping.done(lines["a"][0], failed=False)  # a's turn: its lines go
    assert pool.take_all()[3:] == lines["a"][1:]
    assert grouping.patient
    assert not grouping.more()  # b's and c's lines wait for their leaders' answers
    late = _request(99, "b")
    pool.waiting = 1
    pool.add(late)  # read while a worker waits: held all the same, behind b's leader
    assert grouping.held == 5
    pool.waiting = 0
    grouping.done(lines["b"][0], failed=False)
    assert pool.take_all()[5:] == [*lines["b"][1:], late]  # warm, all of them
    # With more of the pool waiting (the run's start, its end, answers slower than the pool's
    # lines last), a worker idle is time lost: it takes a held line all the same.
    pool.waiting = 2
    assert not grouping.patient
    assert grouping.more()
    assert pool.given[-1] is lines["c"][1]


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.integers(0, 4) | st.none(), min_size=1, max_size=40),
    seed=st.integers(0, 2**32),
    most=st.integers(1, 8),
    most_open=st.integers(1, 3),
    ahead=st.integers(0, 6),
)
def test_every_request_is_given_out_exactly_once_whatever_the_answers(
    keys: list[int | None], seed: int, most: int, most_open: int, ahead: int
) -> None:
    rng = random.Random(seed)
    grouping = Grouping(
        most=most, max_bytes=10**6, most_open=most_open, most_open_idle=most_open + 1, ahead=ahead
    )
    pool = Pool(grouping)
    requests = [_request(n, None if k is None else str(k)) for n, k in enumerate(keys)]
    pending = list(requests)
    in_flight: list[Request] = []

    def step() -> None:
        """One thing the workers do: take a released line, answer one in flight, or start a turn."""
        choice = rng.random()
        if grouping.ready and choice < 0.4:
            pool.given.append(grouping.take())
        elif in_flight and choice < 0.8:
            request = in_flight.pop(rng.randrange(len(in_flight)))
            grouping.done(request, failed=rng.random() < 0.3)
        else:
            grouping.more()
            pool.waiting += rng.random() < 0.2

    seen = 0
    while pending or grouping.held or grouping.ready or in_flight:
        if pending and (rng.random() < 0.5 or not (grouping.ready or in_flight)):
            request = pending[0]
            if request.prefix is None:  # the reader sends it as it comes
                pool.given.append(pending.pop(0))
            elif not grouping.full(len(request.payload)):
                pool.add(pending.pop(0))
            else:
                # The reader waits for room: something held must move on.
                assert grouping.ready or in_flight or grouping.more()
        else:
            step()
        in_flight += pool.given[seen:]
        seen = len(pool.given)
        assert grouping.held <= most
    assert sorted(r.line for r in pool.given) == list(range(len(keys)))  # each once
    assert not grouping._keys
    assert not grouping._waiting
    assert grouping._open == 0


@pytest.mark.parametrize("prefix_key", [prefix_key, group_key], ids=["prefix_key", "group_key"])
def test_the_prefix_key_is_the_model_and_everything_before_the_lines_own_part(
    prefix_key: Callable[..., str | None],
) -> None:
    def body(question: str, system: str = SYSTEM, **more: Any) -> dict[str, Any]:
        return {
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            **more,
        }

    key = prefix_key(body("one"), "m")
    assert key is not None
    assert prefix_key(body("two, another question"), "m") == key
    assert prefix_key(body("one"), "other-model") != key
    assert prefix_key(body("one", system=SYSTEM + "!"), "m") != key
    assert prefix_key(body("one", tools=[{"type": "function"}]), "m") != key
    assert prefix_key(body("one", system="short instructions"), "m") is None  # no long prefix
    assert prefix_key({"messages": [{"role": "user", "content": SYSTEM}]}, "m") is None  # its own part

    def photo(url: str, language: str) -> dict[str, Any]:
        parts = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": f"In {language}"}]
        return {"messages": [{"role": "user", "content": parts}]}

    # The same photo captioned in five languages shares its prefix; another photo does not.
    keys = {
        prefix_key(photo("https://x/1.jpg", language), "m") for language in ("en", "fr", "de", "it", "es")
    }
    assert len(keys) == 1
    assert None not in keys
    assert prefix_key(photo("https://x/2.jpg", "en"), "m") not in keys


PROMPTS, LINES = 30, 480


def _line(n: int, prompts: int, rng: random.Random) -> dict[str, Any]:
    system = f"Assistant {rng.randrange(prompts)}. " + "Label the ticket. " * 300
    return {
        "custom_id": f"t-{n:03d}",
        "model": "test/model",
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Ticket {n}"}],
        "max_tokens": 8,
    }


async def test_a_run_over_a_few_system_prompts_reads_most_of_them_from_the_providers_cache(
    mock, make_settings, tmp_path: Path
) -> None:
    rng = random.Random(23)
    rows = [_line(n, PROMPTS, rng) for n in range(LINES)]
    shares = {}
    for reorder in (False, True):
        async with mock(prefix_cache=8, latency=0.005) as (url, server), aiohttp.ClientSession() as session:
            out = tmp_path / f"out-{reorder}"
            summary = await pipeline.run(make_settings(url, rows, output=out, reorder=reorder, concurrency=8))
            async with session.get(url.removesuffix("/v1") + "/mock/stats") as r:
                served = (await r.json())["served"]
            sent = sorted(body["messages"][-1]["content"] for body in server.state.received)
        assert summary.exit_code == 0
        assert summary.succeeded == LINES
        assert sent == sorted(f"Ticket {n}" for n in range(LINES))  # each sent once
        results = read_jsonl(out / "results.jsonl")
        assert sorted(r["custom_id"] for r in results) == sorted(row["custom_id"] for row in rows)
        shares[reorder] = served["cached_tokens"] / served["prompt_tokens"]
    # Input order: a cache of 8 of 30 prompts holds the next line's about a quarter of the
    # time; grouped, each prompt's first line (and a few leaders more) misses it.
    print(shares)
    assert shares[False] < 0.35
    assert shares[True] > 0.75


async def test_a_prefix_whose_first_line_the_answer_cache_holds_still_has_its_new_lines_cached(
    mock, make_settings, tmp_path: Path
) -> None:
    """A nightly job: each prompt's first line answered last night, kept in the answer cache,
    the rest new. Released all at once after the kept answer, they all missed the provider's
    cache (0 % of their prompt tokens cached); one leading alone first, most of them read it."""
    rng = random.Random(7)
    prompts = 4
    first = [_line(n, prompts, rng) for n in range(prompts)]
    for n, row in enumerate(first):  # one line a prompt, each prompt's first
        row["messages"][0]["content"] = f"Assistant {n}. " + "Label the ticket. " * 300
    new = [_line(n, prompts, rng) for n in range(prompts, 50 * prompts)]
    night = [0.0]  # the mock's clock: a day passes between the runs, its prompt cache forgets
    async with mock(prefix_cache=8, latency=0.005, clock=lambda: night[0]) as (url, server):
        cache = tmp_path / "cache"
        await pipeline.run(make_settings(url, first, output=tmp_path / "night1", cache=cache, concurrency=8))
        before, served = len(server.state.received), dict(server.state.served)
        night[0] += 86_400
        summary = await pipeline.run(
            make_settings(url, first + new, output=tmp_path / "night2", cache=cache, concurrency=64)
        )
        sent = sorted(body["messages"][-1]["content"] for body in server.state.received[before:])
        cached, prompt = (server.state.served[k] - served[k] for k in ("cached_tokens", "prompt_tokens"))
    assert summary.succeeded == len(first) + len(new)
    assert summary.reused == len(first)
    assert sent == sorted(row["messages"][-1]["content"] for row in new)  # each new line sent once
    assert cached / prompt > 0.9  # (released at once after the kept answer: 80 %)


async def test_a_second_run_whose_answers_all_come_from_the_answer_cache_ends(
    mock, make_settings, tmp_path: Path
) -> None:
    """Answered from the cache, a line is done without a wait: lines released then went into
    `ready` while the workers were between looking at it and waiting on the buffer, and
    stayed there, the run stopped for good (63 of 300 lines done)."""
    rng = random.Random(11)
    rows = [_line(n, 2, rng) for n in range(300)]
    async with mock() as (url, server):
        cache = tmp_path / "cache"
        first = await pipeline.run(
            make_settings(url, rows, output=tmp_path / "a", cache=cache, concurrency=32)
        )
        with anyio.fail_after(60):  # (without the bound, a stopped run waits for ever)
            again = await pipeline.run(
                make_settings(url, rows, output=tmp_path / "b", cache=cache, concurrency=32)
            )
    assert first.succeeded == again.succeeded == again.reused == len(rows)
    assert len(server.state.received) == len(rows)  # sent once, by the first run


async def test_a_run_stopped_with_lines_held_leaves_them_to_do_and_the_next_run_sends_each_once(
    mock, make_settings, tmp_path: Path
) -> None:
    rng = random.Random(5)
    rows = [_line(n, PROMPTS, rng) for n in range(LINES)]
    prices = {"test/model": {"prompt": 1.0, "completion": 2.0}}
    async with mock(prefix_cache=8, latency=0.005) as (url, server):
        stopped = await pipeline.run(make_settings(url, rows, max_cost=0.05, prices=prices, concurrency=8))
        again = await pipeline.run(make_settings(url, rows, prices=prices, concurrency=8))
        sent = sorted(body["messages"][-1]["content"] for body in server.state.received)
    assert 0 < stopped.succeeded < LINES  # the budget stopped it with lines still held
    assert stopped.succeeded + again.succeeded == LINES
    assert sent == sorted(f"Ticket {n}" for n in range(LINES))  # each sent once, over both runs
    results = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert sorted(r["custom_id"] for r in results) == sorted(row["custom_id"] for row in rows)


def _clock(step: float) -> Callable[[], float]:
    """A clock that moves `step` seconds each time it is read: every leader's round trip at
    least that long."""
    return itertools.count(0.0, step).__next__


def test_a_worker_that_would_wait_gets_a_held_line_and_a_line_read_then_is_not_held() -> None:
    # (Answers in seconds, as real models give them: a worker waiting is wall time lost.)
    grouping = Grouping(most=100, max_bytes=10**6, most_open=1, most_open_idle=1, clock=_clock(1.0))
    pool = Pool(grouping)
    lines = {key: [_request(10 * k + i, key) for i in range(3)] for k, key in enumerate("abc")}
    for i in range(3):
        for key in "abc":
            pool.add(lines[key][i])
    assert pool.take_all() == [lines[key][0] for key in "abc"]  # the leaders, in flight
    grouping.done(lines["a"][0], failed=False)  # a's turn: its lines go
    pool.take_all()
    # b's and c's leaders are still in flight, one turn at a time: their lines wait, but a
    # worker about to wait for lack of lines takes one all the same, until none is held.
    while grouping.held:
        assert grouping.more()
        pool.take_all()
    assert not grouping.more()
    assert sorted(r.line for r in pool.given) == sorted(r.line for rs in lines.values() for r in rs)
    # A line read while a worker waits goes to it, though its prefix's leader is in flight.
    late = _request(99, "b")
    pool.waiting = 1
    pool.add(late)
    assert pool.given[-1] is late
    assert grouping.held == 0


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.integers(0, 6), min_size=1, max_size=60),
    seed=st.integers(0, 2**32),
    workers=st.integers(1, 8),
    most_open=st.integers(1, 3),
    ahead=st.integers(0, 8),
    step=st.sampled_from([0.01, 1.0]),
)
def test_property_no_worker_waits_while_a_line_is_held(
    keys: list[int], seed: int, workers: int, most_open: int, ahead: int, step: float
) -> None:
    """Workers answer in any order; whenever one would wait for lack of lines (nothing in
    `ready`, `more` found nothing), nothing is held; but where leaders answer quickly, a leader
    is in flight, whose answer releases lines (and every line goes in the end)."""
    rng = random.Random(seed)
    grouping = Grouping(
        most=1000,
        max_bytes=10**6,
        most_open=most_open,
        most_open_idle=most_open,
        ahead=ahead,
        clock=_clock(step),
    )

    def may_wait() -> bool:
        return grouping.held == 0 or (grouping.patient and bool(grouping._leading))

    pool = Pool(grouping)
    pending = [_request(n, str(k)) for n, k in enumerate(keys)]
    in_flight: list[Request] = []

    def work() -> None:
        """Every idle worker takes a line: a released one, else one `more` gives; else it waits."""
        pool.waiting = 0
        while len(in_flight) < workers:
            if not grouping.ready and not grouping.more():
                assert may_wait()  # a worker waits: nothing may be held (or a leader answers soon)
                pool.waiting = workers - len(in_flight)
                return
            in_flight.append(grouping.take())
        pool.waiting = 0

    while pending or in_flight or grouping.held:
        if pending and rng.random() < 0.6:
            pool.add(pending.pop(0))
            in_flight += pool.given  # (handed to a waiting worker)
            pool.given.clear()
        elif in_flight:
            grouping.done(in_flight.pop(rng.randrange(len(in_flight))), failed=rng.random() < 0.2)
            in_flight += pool.given
            pool.given.clear()
        assert not pool.waiting or may_wait()  # (lines held with a worker waiting)
        work()
    assert not grouping._keys


_TEXT = st.text(max_size=20)
_PART = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, _TEXT),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": f"https://x/{u}.png"}}, _TEXT),
)
_MESSAGE = st.builds(
    lambda role, content: {"role": role, "content": content},
    st.sampled_from(["system", "user", "assistant", "developer"]),
    st.one_of(_TEXT, st.lists(_PART, min_size=1, max_size=3)),
)


def _changed(message: dict[str, Any], how: int) -> dict[str, Any]:
    """`message` changed as a line's prefix may differ from another's."""
    content = message["content"]
    if how == 0:  # its text (or image) one character longer
        if isinstance(content, str):
            return {**message, "content": content + "!"}
        part = content[0]
        if part["type"] == "text":
            part = {**part, "text": part["text"] + "!"}
        else:
            part = {**part, "image_url": {"url": part["image_url"]["url"] + "!"}}
        return {**message, "content": [part, *content[1:]]}
    if how == 1:
        return {**message, "role": "tool" if message["role"] != "tool" else "user"}
    return {**message, "name": "someone"}


@settings(max_examples=150)
@given(
    lead=st.lists(_MESSAGE, max_size=3),
    own=st.lists(_TEXT | st.lists(_PART, min_size=1, max_size=1), min_size=2, max_size=2),  # one block
    where=st.integers(0, 3),
    how=st.integers(0, 4),
)
def test_property_the_same_prefix_is_the_same_key_and_any_change_to_it_another(
    lead: list[dict[str, Any]], own: list[Any], where: int, how: int
) -> None:
    """Lines that differ only in their own last part share a key; lines whose prefixes differ
    (a character, a role, a message more, a name, the model, the tools) never do."""
    prefix = [{"role": "system", "content": SYSTEM}, *lead]

    def key(messages: list[dict[str, Any]], model: str = "m", **more: Any) -> tuple[str, str] | None:
        body = {"messages": messages, **more}
        stable, quick = prefix_key(body, model), group_key(body, model)
        assert (stable is None) == (quick is None)
        return None if stable is None or quick is None else (stable, quick)

    one = key([*prefix, {"role": "user", "content": own[0]}])
    assert one is not None
    assert key([*prefix, {"role": "user", "content": own[1]}]) == one
    last = {"role": "user", "content": own[0]}
    if how <= 2:
        i = where % len(prefix)
        other = key([*prefix[:i], _changed(prefix[i], how), *prefix[i + 1 :], last])
    elif how == 3:
        other = key([*prefix[: where + 1], {"role": "user", "content": "more"}, *prefix[where + 1 :], last])
    else:
        other = key([*prefix, last], model="m2") if where % 2 else key([*prefix, last], tools=[{"t": where}])
    assert other is not None
    assert other[0] != one[0]
    assert other[1] != one[1]  # (the quick key too)


def test_a_leader_out_far_longer_than_leaders_take_is_not_waited_for() -> None:
    # (Second reader: a leader in a retry's backoff (a 429's Retry-After of a minute), or of a
    # slow model in a run whose other models answer in 20 ms, keeps up to half the pool idle
    # for as long: the average of leaders answered says nothing of the one still out.)
    now = [0.0]
    grouping = Grouping(
        most=100, max_bytes=10**6, most_open=1, most_open_idle=1, ahead=8, clock=lambda: now[0]
    )
    pool = Pool(grouping)
    a = [_request(n, "a") for n in range(2)]
    b = [_request(10 + n, "b") for n in range(3)]
    for request in (a[0], b[0], a[1], b[1], b[2]):
        pool.add(request)
    assert pool.take_all() == [a[0], b[0]]  # the leaders
    now[0] = 0.02
    grouping.done(a[0], failed=False)  # answered in 20 ms: a's turn
    assert pool.take_all()[2:] == [a[1]]
    grouping.done(a[1], failed=False)
    now[0] = 120.0  # b's leader is still out, two minutes later
    pool.waiting = 1  # one worker of 8 waits
    assert grouping.held == 2
    assert grouping.more()  # it takes one of b's lines rather than wait on and on
    assert pool.given[-1] is b[1]


_VARIANT_CONTENT: list[Any] = [
    "hi",
    [{"type": "text", "text": "hi"}],
    [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
    [{"type": "text", "text": "hi", "x": 1}],
    '{"text":"hi","type":"text","x":1}',  # a text that reads as the part above's JSON
    [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}],
    '{"image_url":{"url":"https://x/a.png"},"type":"image_url"}',
    None,
    [],
    [{"type": "text", "text": "hi"}, {"type": "text", "text": "hi"}],
]


def test_the_quick_key_is_equal_exactly_where_the_stable_key_is_over_look_alike_bodies() -> None:
    """Second reader: every pair of bodies whose one message differs in its content among a few
    look-alike forms (a string and its one text part, markers on the part, content None or
    empty, a text that reads as another part's JSON), with and without a `name` or a marker on
    the message: `group_key` equal exactly where `prefix_key` is (a role that reads as another
    message's JSON head, '{"name":"n","role":"user"}', collides the same way)."""

    def body(message: dict[str, Any]) -> dict[str, Any]:
        return {
            "model": "m",
            "messages": [{"role": "system", "content": SYSTEM}, message, {"role": "user", "content": "q"}],
        }

    wrong = []
    for named, marked in itertools.product((False, True), repeat=2):
        more = {
            **({"name": "n"} if named else {}),
            **({"cache_control": {"type": "ephemeral"}} if marked else {}),
        }
        for one, other in itertools.product(_VARIANT_CONTENT, repeat=2):
            a, b = (
                body({"role": "user", "content": one, **more}),
                body({"role": "user", "content": other, **more}),
            )
            if (prefix_key(a) == prefix_key(b)) != (group_key(a) == group_key(b)):
                wrong.append((one, other))
    assert not wrong
