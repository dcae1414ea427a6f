"""An outage is nobody's failure: while the endpoint as a whole fails, the pool pauses and
probes, no request spends an attempt, and only an outage longer than --give-up-after stops the
run (exit 3, resumable). A request that fails while others succeed still fails."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
import orjson
from aiohttp import web

import pipeline
from pipeline.errors import ConnectionDropped, EmptyAnswer, RequestError, RequestTimeout
from pipeline.pace.finder import RateFinder
from pipeline.pace.gate import Gate, Slot
from pipeline.pace.pacer import Pacer
from pipeline.pace.scopes import Scopes
from pipeline.pace.window import Window
from pipeline.send.status import http_error
from tests.conftest import bodies, read_jsonl
from tests.scripted import Scripted, answer, json, scripted

POISON = "question 7"  # always a 500, while the others get answers


class Endpoint:
    """Answers every request, but the poison one's; after `after` answers, goes away."""

    def __init__(self, after: int, poison: str | None = None) -> None:
        self.after = after
        self.poison = poison
        self.answered = Counter[str]()
        self.poisoned = 0
        self.gone = anyio.Event()

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = body["messages"][0]["content"]
        if text == self.poison:
            self.poisoned += 1
            return json({"error": {"message": "poison", "type": "server_error"}}, status=500)
        self.answered[text] += 1
        if sum(self.answered.values()) == self.after:
            self.gone.set()
        return answer(body)


async def outage(server: Scripted, endpoint: Endpoint, seconds: float | None) -> None:
    await endpoint.gone.wait()
    await server.go_away()
    if seconds is not None:
        await anyio.sleep(seconds)  # the outage itself: what the run must ride out
        await server.come_back()


async def test_an_outage_fails_no_line_but_a_poison_request_still_fails(
    make_settings, tmp_path: Path
) -> None:
    n = 400
    endpoint = Endpoint(after=100, poison=POISON)
    async with scripted(endpoint) as server, anyio.create_task_group() as tg:
        tg.start_soon(outage, server, endpoint, 2.5)
        settings = make_settings(
            server.url, bodies(n), concurrency=32, max_attempts=4, backoff_base=0.1, backoff_max=1.0
        )
        summary = await pipeline.run(settings)
    results = read_jsonl(tmp_path / "out/results.jsonl")
    errors = read_jsonl(tmp_path / "out/errors.jsonl")
    ids = Counter(r["custom_id"] for r in results)
    assert summary.exit_code == 1, summary.message
    assert len(ids) == n - 1
    assert max(ids.values()) == 1
    assert [(e["custom_id"], e["error"]["code"], e["response"]["status_code"]) for e in errors] == [
        ("job-7", "http_error", 500)
    ]
    assert errors[0]["attempts"] >= 4  # its attempts spent where the endpoint answered
    usage = orjson.loads((tmp_path / "out/usage.json").read_bytes())
    # Paused and probed: the requests out when it went and a few quick retries, then a couple
    # at a time (with the whole window after each pause, and every failure an attempt spent,
    # it was 430 here).
    assert usage["answers_by_status"]["connection_error"] <= 3 * 32


async def test_an_outage_longer_than_give_up_after_stops_the_run_and_it_resumes(
    make_settings, tmp_path: Path
) -> None:
    n = 200
    endpoint = Endpoint(after=50)
    async with scripted(endpoint) as server:
        async with anyio.create_task_group() as tg:
            tg.start_soon(outage, server, endpoint, None)  # gone for good
            settings = make_settings(server.url, bodies(n), concurrency=16, give_up_after=1.0)
            summary = await pipeline.run(settings)
        assert summary.exit_code == 3
        assert "the endpoint has failed every request for 1.0s" in summary.message
        assert "run the same command again" in summary.message
        assert summary.pending
        assert summary.pending > 0
        assert read_jsonl(tmp_path / "out/errors.jsonl") == []  # nobody's failure
        await server.come_back()
        summary = await pipeline.run(settings)
    assert summary.exit_code == 0, summary.message
    ids = Counter(r["custom_id"] for r in read_jsonl(tmp_path / "out/results.jsonl"))
    assert len(ids) == n
    assert max(ids.values()) == 1
    assert max(endpoint.answered.values()) == 1  # nothing answered was asked for again


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_a_wall_of_503s_or_timeouts_is_an_outage_and_any_answer_ends_it() -> None:
    pacer, window, clock = Pacer(), Window(64, start=64), Clock()
    gate = Gate(Scopes(RateFinder(pacer, window, clock=clock)))

    async def go() -> Slot:
        # The gate without its pacer: the pauses are not waited out here (nor a cut window).
        assert window.taken < window.size, "the window was cut: the endpoint was taken for down"
        await window.acquire()
        slot = Slot(gate, gate.account.chain)
        slot.reserved.append(0)
        slot.go()
        return slot

    async def attempt(error: RequestError) -> bool:
        (await go()).failed(error)
        return error.outage

    # A 200 that holds no answer is an answer: however many, the endpoint is up, and each
    # spends its attempt.
    assert not any([await attempt(EmptyAnswer("empty")) for _ in range(20)])
    # Every request of one model fails while another model's are out, slower: no outage...
    slow = [await go() for _ in range(3)]
    assert not any([await attempt(http_error(502, "upstream down")) for _ in range(30)])
    # ...unless nothing but failures comes back for half a minute (packets dropped: the
    # requests out hang, the new ones time out connecting).
    clock.now += 30.0
    assert await attempt(ConnectionDropped("cannot connect within 30s"))
    for slot in slow:
        slot.answered(1.0, None, 0)
    for make in (
        lambda: http_error(503, "overloaded"),
        lambda: RequestTimeout("slow"),
        lambda: http_error(502, ""),
    ):
        spent = [await attempt(make()) for _ in range(8)]
        assert spent == [False] * 4 + [True] * 4  # the fifth in a row, none out: down, nobody pays
        assert window.size == 2
        assert not await attempt(http_error(429, "later"))  # a refusal is an answer: up again
        assert window.size > 2  # as it was (a run of 503s also has the rate finder cut it)


async def test_a_poison_request_alone_fails_after_its_attempts_not_as_an_outage(
    make_settings, tmp_path: Path
) -> None:
    # Nothing else out to compare it with (the only line of a job, the last of a run): a
    # request that always gets a 500 is its own failure. Taken for an outage it spent no
    # attempt, and the run stopped after --give-up-after (exit 3), on every resume.
    endpoint = Endpoint(after=0, poison="question 0")
    async with scripted(endpoint) as server:
        settings = make_settings(server.url, bodies(1), max_attempts=8, give_up_after=3.0)
        summary = await pipeline.run(settings)
    assert summary.exit_code == 1, summary.message
    assert endpoint.poisoned == 8
    [error] = read_jsonl(tmp_path / "out/errors.jsonl")
    assert (error["error"]["code"], error["attempts"]) == ("http_error", 8)


async def test_refused_connections_are_an_outage_even_for_a_request_alone(
    make_settings, tmp_path: Path
) -> None:
    # One request at a time: no other request to fail with it, but a connection refused is no
    # request's fault. The outage spends none of its 3 attempts, and every line is a result.
    n = 6
    endpoint = Endpoint(after=2)
    async with scripted(endpoint) as server, anyio.create_task_group() as tg:
        tg.start_soon(outage, server, endpoint, 0.5)
        summary = await pipeline.run(make_settings(server.url, bodies(n), concurrency=1, max_attempts=3))
    assert summary.exit_code == 0, summary.message
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) == n


async def test_a_run_started_during_an_outage_waits_for_the_endpoint(make_settings, tmp_path: Path) -> None:
    endpoint = Endpoint(after=-1)
    async with scripted(endpoint) as server, anyio.create_task_group() as tg:
        await server.go_away()

        async def back() -> None:
            await anyio.sleep(0.5)
            await server.come_back()

        tg.start_soon(back)
        summary = await pipeline.run(make_settings(server.url, bodies(20), give_up_after=10.0))
    assert summary.exit_code == 0, summary.message
