"""Several models on one key: which limit a refusal reads (told from the send order alone, on
a fake clock), and a model that lets nothing through."""

from __future__ import annotations

import asyncio
import re
import time
import tracemalloc
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from pipeline.jobfile import ModelLimit
from pipeline.pace.finder import RateFinder
from pipeline.pace.gate import Gate, GivenUp, Slot
from pipeline.pace.leased import shared_pacer
from pipeline.pace.pacer import Pacer
from pipeline.pace.reading import READ_WAIT
from pipeline.pace.scopes import Scope, Scopes
from pipeline.pace.sendlog import SIZE
from pipeline.pace.stated import MARGIN
from pipeline.pace.store import Store
from pipeline.pace.tokens import STEP
from pipeline.pace.window import Window
from pipeline.run.runner import run
from pipeline.send.status import http_error
from tests.conftest import bodies, read_jsonl
from tests.scripted import answer, json, scripted
from tests.simulated import Clock

PAID, DEAD, FREE = "v/paid", "v/dead:free", "v/free:free"


def _gate() -> tuple[Gate, Clock]:
    clock = Clock()
    finder = RateFinder(Pacer(), Window(200), clock=clock, stop=lambda stopped: None)
    return Gate(Scopes(finder)), clock


def _send(gate: Gate, *models: str) -> list[Slot]:
    """Requests of `models` sent in that order (past the pace and the window: not waited for)."""
    slots = []
    for model in models:
        slot = Slot(gate, (gate.scopes.by_model.get(model) or gate.account).chain, model)
        slot.reserved += [0] * len(slot.scopes)
        slot.go()
        slots.append(slot)
    return slots


def _through(gate: Gate, slots: list[Slot]) -> None:
    for slot in slots:
        gate.account.finder.success(slot.tickets[-1], 0.1)


def _refuse(gate: Gate, slots: list[Slot]) -> None:
    for slot in slots:
        slot.failed(http_error(429, "Rate limit exceeded"))


async def test_an_account_pace_read_at_several_models_refusals_is_dropped_once_each_has_its_own() -> None:
    """Four `:free` models, each limited on its own, among a paid model's lines: their
    retries come back together, and twice a run of refusals in the account's send order is
    made of two of them. The account's pace read there is theirs: once each has a pace of its
    own, the paid model's lines go unpaced again."""
    gate, clock = _gate()
    finder = gate.account.finder
    _through(gate, _send(gate, PAID, PAID))
    _refuse(gate, _send(gate, "a:free", "b:free", "a:free", "b:free"))
    assert finder.cuts == 1  # read as the account's, for now: two models may meet its limit
    clock.now += 2.0
    _through(gate, _send(gate, PAID, PAID))
    _refuse(gate, _send(gate, "c:free", "d:free", "c:free", "d:free"))
    assert finder.cuts == 2
    assert finder.pacer.request_rate is not None  # the paid model held to their limit
    for model in ("a:free", "b:free", "c:free", "d:free"):
        clock.now += 2.0
        for _ in range(4):
            slots = _send(gate, model, PAID, PAID)
            _through(gate, slots[1:])
            _refuse(gate, slots[:1])
        assert isinstance(gate.scopes.by_model.get(model), Scope)
    assert finder.limit is None
    assert finder.pacer.request_rate is None  # the paid model's lines unpaced again


async def test_refusals_of_many_models_side_by_side_leave_the_account_unpaced() -> None:
    """Forty `:free` models with a few lines each, each limited on its own: their retries
    come back together, refused side by side in the account's send order, one each, while
    the paid model's requests around them go through. No account limit is read there."""
    gate, _ = _gate()
    for k in range(5):
        _through(gate, _send(gate, PAID, PAID, PAID))
        _refuse(gate, _send(gate, *(f"m{k}-{i}:free" for i in range(8))))
    _through(gate, _send(gate, PAID, PAID, PAID))
    assert gate.account.finder.cuts == 0
    assert gate.account.finder.pacer.request_rate is None


async def test_a_request_out_when_its_model_gets_a_pace_of_its_own_counts_in_that_pace() -> None:
    """A `:free` model's request already sent, and another waiting to go, when the model's
    refusals give it a pace of its own: each is that pace's request from then on, so that its
    refusal is read by the model's pace, at its place in the model's send order, and the
    account's pace is not cut for it."""
    gate, _ = _gate()
    [out] = _send(gate, FREE)
    entered = Slot(gate, gate.account.chain, FREE)  # past the gate, not yet sent
    entered.reserved.append(0)
    for _ in range(4):
        slots = _send(gate, FREE, PAID, PAID)
        _through(gate, slots[1:])
        _refuse(gate, slots[:1])
    scope = gate.scopes.by_model[FREE]
    entered.go()
    _refuse(gate, [out, entered])
    for slot in (out, entered):
        assert slot.scopes == (scope, gate.account)
        assert slot.tickets[0] >= 0
        assert scope.finder.log.refused(slot.tickets[0])
        assert gate.account.finder.log.refused(slot.tickets[-1])  # not let through, and no more
    assert scope.finder.cuts == 1  # its run of four, read at once
    assert gate.account.finder.cuts == 0


async def test_a_request_waiting_for_a_model_given_up_leaves_the_gate_holding_nothing() -> None:
    """A model that lets nothing through is given up while a request waits for its pace: the
    request leaves the gate at once, holding no slot in flight, and so does the next; the
    other models' requests go on."""
    finder = RateFinder(Pacer(), Window(8, start=8))
    gate = Gate(Scopes(finder, limits={DEAD: ModelLimit(rpm=1)}))
    await gate.enter(0, DEAD)
    waiting = asyncio.ensure_future(gate.enter(0, DEAD))  # a minute from now, at 1 a minute
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.scopes.by_model[DEAD].finder.outage.refusing(0.0, None, "free-models-per-day")
    with pytest.raises(GivenUp, match=f"the server refuses every request for {re.escape(DEAD)}"):
        await waiting
    with pytest.raises(GivenUp):
        await gate.enter(0, DEAD)
    assert gate.window.in_flight == 1  # the first, sent before
    await gate.enter(0, PAID)
    assert gate.window.in_flight == 2


async def test_a_request_past_its_models_pace_when_the_model_is_given_up_is_not_sent() -> None:
    """Given up while a request of its model waits for a slot in flight (past the model's
    pace): the request leaves the gate unsent, holding nothing, as it did before the gate
    raised GivenUp (the worker checked the model again once through the gate)."""
    finder = RateFinder(Pacer(), Window(1, start=1))
    gate = Gate(Scopes(finder, limits={DEAD: ModelLimit(rpm=600)}))
    first = await gate.enter(0, PAID)
    waiting = asyncio.ensure_future(gate.enter(0, DEAD))  # its pace lets it by; the window not
    await asyncio.sleep(0)
    assert not waiting.done()
    gate.scopes.by_model[DEAD].finder.outage.refusing(0.0, None, "free-models-per-day")
    first.unused()
    with pytest.raises(GivenUp):
        await waiting
    assert gate.window.in_flight == 0


async def test_a_models_stated_limit_paces_its_model_and_a_token_refusal_charges_each_scope() -> None:
    """Headers that come with a model's answer state the model's limit (its scope's, where it
    has one), not the account's; a refusal of tokens charges back each scope's reservation."""
    # (token limits high enough that nobody waits for them here)
    finder = RateFinder(Pacer(token_rate=1e9), Window(8, start=8))
    gate = Gate(Scopes(finder, limits={FREE: ModelLimit(tpm=6e10)}))
    scope = gate.scopes.by_model[FREE]
    slot = await gate.enter(100, FREE)
    assert slot.reserved == [100, 100]  # in each scope's token pace
    slot.go()
    slot.answered(0.1, {"x-ratelimit-limit-requests": "600"}, 40)
    assert scope.pacer.request_rate == pytest.approx(10 * MARGIN)
    assert gate.account.pacer.request_rate is None
    refused = await gate.enter(100, FREE)
    refused.go()
    refused.failed(http_error(429, "Rate limit reached for tokens per min"))
    assert [each.pacer.tokens.factor for each in (scope, gate.account)] == [1.0 + STEP] * 2


async def test_a_scope_for_each_of_hundreds_of_models_costs_little_memory() -> None:
    """A job naming hundreds of `:free` models, each found limited: each has a scope, whose
    send log sees its model's requests; a few hundred of them stay within tens of megabytes."""
    gate, _ = _gate()
    scopes = gate.scopes
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(16):
            scope = scopes._add(f"v/m{i}:free", None, None)
            for _ in range(SIZE):  # its log full of requests sent at its pace
                scope.finder.sent()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    per_scope = sum(stat.size_diff for stat in after.compare_to(before, "filename")) / 16
    assert per_scope < 150_000, per_scope


async def test_a_model_that_lets_nothing_through_is_given_up_and_the_others_go_on(
    make_settings: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A `:free` model whose quota is spent refuses every request: after --give-up-after, its
    lines fail unsent (the next run tries them again) and the paid model's lines go on,
    where the whole run used to stop (exit 3) with most of them left to do."""
    paid: list[float] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["model"] == DEAD:
            return json(
                {"error": {"message": "Rate limit exceeded: free-models-per-day", "code": 429}}, status=429
            )
        await asyncio.sleep(0.02)
        paid.append(time.monotonic())
        return answer(body)

    rows = [
        {
            "custom_id": f"r{i}",
            "model": DEAD if i % 40 == 0 else PAID,
            "messages": [{"role": "user", "content": "q"}],
        }
        for i in range(400)
    ]
    job = tmp_path / "job.toml"
    job.write_text(f'[limits."{DEAD}"]\nrpm = 600\n')
    async with scripted(handler) as endpoint:
        settings = make_settings(endpoint.url, rows, concurrency=4, give_up_after=1.0, job=job)
        summary = await run(settings)
    assert summary.exit_code == 1  # some lines failed: not stopped (3)
    assert len(paid) == 390  # every paid line done
    failed = read_jsonl(tmp_path / "out" / "errors.jsonl")
    assert sorted(f["custom_id"] for f in failed) == sorted(f"r{i}" for i in range(0, 400, 40))
    said = capsys.readouterr().err
    assert said.count(f"the server refuses every request for {DEAD}") == 1


async def test_a_limit_given_for_a_model_no_line_names_is_pointed_out(
    mock: Any, make_settings: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`[limits."vendor/model:free"]` where the lines say `vendor/model-free`: the model meant
    goes unpaced, and the run says which name no line used (not that it paced it)."""
    job = tmp_path / "job.toml"
    job.write_text('[limits."test/model:free"]\nrpm = 60\n')
    async with mock() as (base_url, _):
        summary = await run(make_settings(base_url, bodies(20), job=job))
    assert summary.exit_code == 0
    said = capsys.readouterr().err
    assert (
        "[limits.'test/model:free']: no line of this run named that model (the lines named 'test/model')"
        in said
    )
    usage = orjson.loads((tmp_path / "out" / "usage.json").read_bytes())
    assert "models_paced_at_rpm" not in usage["runs"][-1]


def test_a_5xx_of_a_model_with_a_scope_of_its_own_is_told_to_its_scope() -> None:
    """A request of a model with a pace of its own that the endpoint fails (a 500) is told
    to the model's scope as well as the account's: a shared reading of the model's limit
    waits for the answers to what it sent, and one never told held every such reading."""
    clock = Clock(9.0)
    finder = RateFinder(Pacer(), Window(8, start=8), clock=clock, stop=lambda stopped: None)

    def pacer_for(model: str | None, rate: float | None, tokens: float | None) -> Pacer:
        return shared_pacer(lambda: Store("redis://127.0.0.1:1", "unused"), "a store", request_rate=rate)

    gate = Gate(Scopes(finder, limits={FREE: ModelLimit(rpm=600)}, pacer_for=pacer_for))
    scope = gate.scopes.by_model[FREE]
    log = scope.pacer.account.account_log  # type: ignore[union-attr]
    log.offset = 0.0  # the store's clock known (the same as ours)
    (slot,) = _send(gate, FREE)
    assert log.whole(9.0, READ_WAIT) != -1.0  # out: a reading of the model's limit waits for it
    clock.now = 9.1
    slot.failed(http_error(500, "Internal Server Error"))
    assert log.whole(9.1, READ_WAIT) == -1.0  # none out
    assert scope.finder.outage.out == 0


async def test_an_answer_whose_send_the_log_no_longer_holds_is_not_told_with_another_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A request out for 30 s while four quick ones went through a send log of four: its
    place in the log is a later request's. Told to the shared log at that request's time,
    the slow answer passed for one of 0.1 s, and a model answering in seconds was read by
    admission (what its answers tell little of: 6 where 60 got through, REVIEW5)."""
    clock = Clock(9.0)
    monkeypatch.setattr(asyncio.get_running_loop(), "time", clock)  # the shared log's clock
    pacer = shared_pacer(lambda: Store("redis://127.0.0.1:1", "unused"), "a store")
    finder = RateFinder(pacer, Window(8), clock=clock, log_size=4, stop=lambda stopped: None)
    log = pacer.account.account_log  # type: ignore[union-attr]
    slow = finder.sent()
    clock.now = 38.9
    quick = [finder.sent() for _ in range(4)]
    clock.now = 39.0
    finder.success(slow, 30.0)
    assert log.floor == 0.0  # no quick answer seen...
    assert not log.by_answer  # ...so read by send
    for ticket in quick:
        finder.success(ticket, 0.1)
    assert log.floor == pytest.approx(0.1)


async def test_a_refusal_of_a_request_its_models_log_never_held_is_not_read_there(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A model's request sent so long before the model got a (shared) pace of its own that
    the account's log no longer held it: in the model's log it has no ticket (-1). Read there
    as one, its refusal was told to the shared log as sent at the time of the log's last
    slot (0.0, none yet): a refusal of 1,000 s, and the model, answering in 2 s and refused
    at once, was read by admission."""
    clock = Clock()
    monkeypatch.setattr(asyncio.get_running_loop(), "time", clock)  # the shared log's clock
    finder = RateFinder(Pacer(), Window(200), clock=clock, log_size=16, stop=lambda stopped: None)

    def pacer_for(model: str | None, rate: float | None, tokens: float | None) -> Pacer:
        return shared_pacer(lambda: Store("redis://127.0.0.1:1", "unused"), "a store", request_rate=rate)

    gate = Gate(Scopes(finder, pacer_for=pacer_for))
    [out] = _send(gate, FREE)
    _through(gate, _send(gate, *[PAID] * 16))  # the account's log of 16 wraps past it
    for _ in range(4):
        slots = _send(gate, FREE, PAID, PAID)
        _through(gate, slots[1:])
        _refuse(gate, slots[:1])
    log = gate.scopes.by_model[FREE].pacer.account.account_log  # type: ignore[union-attr]
    [answered] = _send(gate, FREE)
    clock.now += 2.0
    answered.answered(2.0, None, 0)
    assert not log.by_answer  # answers of 2 s, refusals at once: read by send
    _refuse(gate, [out])
    assert out.tickets[0] == -1
    assert not log.by_answer


def test_a_refusal_of_a_model_with_a_scope_of_its_own_leaves_no_request_out_for_the_account() -> None:
    """A shared account's log holds what each process has out: a reading by send waits for
    it, and a refusal of the account's that comes back with a request sent FAST or more before
    it still out makes its reading by send. A request its model's own scope read the refusal
    of was never answered there: out for ten minutes, and the account's next refusal, 20 ms
    answers or not, read its limit by send (0.4 to 0.8 of what got through on busy cores)."""
    clock = Clock(9.0)
    pacer = shared_pacer(lambda: Store("redis://127.0.0.1:1", "unused"), "a store")
    finder = RateFinder(pacer, Window(8, start=8), clock=clock, stop=lambda stopped: None)
    gate = Gate(Scopes(finder, limits={FREE: ModelLimit(rpm=600)}))
    assert finder.account is not None
    log = finder.account.account_log
    log.offset = 0.0  # the store's clock known (the same as ours)
    (slot,) = _send(gate, FREE)
    clock.now = 9.1
    slot.failed(http_error(429, "Too Many Requests"))  # the model's limit: its scope reads it
    assert log.whole(9.1, READ_WAIT) == -1.0  # none out
    # As the account's link tells them: a request of another model let through in 20 ms, then
    # one refused, sent half a second after the model's.
    log.admitted(9.1, 9.12)
    log.refused(9.5, 10.0, 9.52)
    assert log.by_answer
