"""The retry policy on its own, with a sleep that records instead of waiting; and what a server
may say about waiting (Retry-After and its kin), end to end."""

from __future__ import annotations

import email.utils
import time

import orjson
import pytest
from multidict import CIMultiDict

from pipeline.errors import ConnectionDropped, HTTPStatusError, RequestError, RunStopped
from pipeline.send.client import error_for
from pipeline.send.retry import RetryPolicy
from pipeline.send.status import http_error, provider_error
from pipeline.send.waits import DAY, parse_duration, retry_after, said_wait


class Script:
    """Answers an attempt with the next error of the list, then with "ok"."""

    def __init__(self, *errors: RequestError) -> None:
        self.errors = list(errors)
        self.attempts = 0
        self.slept: list[float] = []

    async def __call__(self) -> str:
        self.attempts += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def status(code: int, retry_after: float | None = None) -> HTTPStatusError:
    return http_error(code, "", retry_after=retry_after)


def policy(
    *, max_attempts: int = 5, max_time: float = 600.0, base: float = 0.1, cap: float = 30.0
) -> RetryPolicy:
    return RetryPolicy(max_attempts=max_attempts, max_time=max_time, base=base, cap=cap)


async def test_success_at_once_never_sleeps() -> None:
    script = Script()
    assert await policy().call(script, sleep=script.sleep) == "ok"
    assert (script.attempts, script.slept) == (1, [])


async def test_transient_failures_are_retried_with_capped_jittered_backoff() -> None:
    script = Script(status(500), ConnectionDropped("dropped"), status(503))
    assert await policy(base=0.1, cap=0.3).call(script, sleep=script.sleep) == "ok"
    assert script.attempts == 4
    assert len(script.slept) == 3
    # full jitter: each wait in [0, min(cap, base * 2 ** n)]
    for n, slept in enumerate(script.slept):
        assert 0 <= slept <= min(0.3, 0.1 * 2**n)


async def test_retry_after_is_a_floor() -> None:
    script = Script(status(429, retry_after=7.5))
    assert await policy().call(script, sleep=script.sleep) == "ok"
    assert script.slept == [7.5]


async def test_a_client_error_is_not_retried() -> None:
    script = Script(status(400))
    with pytest.raises(HTTPStatusError) as caught:
        await policy().call(script, sleep=script.sleep)
    assert caught.value.status == 400
    assert (script.attempts, script.slept) == (1, [])


async def test_a_first_attempt_made_by_the_caller_counts_as_one_of_the_attempts() -> None:
    """The worker makes a request's first attempt itself (`failed`: how it ended): the
    policy goes on from there, the attempts and the refusals' patience as if it had made it."""
    script = Script(status(502), status(503))
    with pytest.raises(HTTPStatusError) as caught:
        await policy(max_attempts=3).call(script, sleep=script.sleep, failed=status(500))
    assert script.attempts == 2  # the caller's, then two more: three in all
    assert caught.value.status == 503
    refused = Script()
    assert await policy(max_attempts=1).call(refused, sleep=refused.sleep, failed=status(429, 2.0)) == "ok"
    assert (refused.attempts, refused.slept) == (1, [2.0])  # a refusal spends no attempt
    client_error = Script()
    with pytest.raises(HTTPStatusError):
        await policy().call(client_error, sleep=client_error.sleep, failed=status(400))
    assert client_error.attempts == 0


async def test_attempts_are_bounded_and_the_last_error_is_raised() -> None:
    script = Script(status(500), status(502), status(503), status(504), status(500))
    with pytest.raises(HTTPStatusError) as caught:
        await policy(max_attempts=3).call(script, sleep=script.sleep)
    assert script.attempts == 3
    assert caught.value.status == 503


class Clock:
    """time.monotonic for the policy, moved on only by the recorded sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_total_time_counts_the_coming_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    # Waits of 10 s each within 25 s: two waits fit, the third would end past the bound.
    script = Script(*(status(503, retry_after=10.0) for _ in range(10)))

    async def sleep(seconds: float) -> None:
        script.slept.append(seconds)
        clock.now += seconds

    with pytest.raises(HTTPStatusError):
        await policy(max_attempts=100, max_time=25.0).call(script, sleep=sleep)
    assert script.slept == [10.0, 10.0]
    assert script.attempts == 3


async def test_the_total_time_includes_the_first_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)

    async def slow_then_fail() -> str:
        clock.now += 30.0  # a first attempt that took longer than the bound
        raise status(500)

    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    with pytest.raises(HTTPStatusError):
        await policy(max_time=25.0).call(slow_then_fail, sleep=sleep)
    assert slept == []


async def test_a_refusal_spends_no_attempt() -> None:
    # "Later" eight times, with two attempts allowed: still a success, not a failure.
    script = Script(*(status(429, retry_after=0.5) for _ in range(8)))
    assert await policy(max_attempts=2).call(script, sleep=script.sleep) == "ok"
    assert script.attempts == 9
    assert script.slept == [0.5] * 8


async def test_time_spent_refused_is_not_time_spent_failing(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    script = Script(*(status(429, retry_after=10.0) for _ in range(10)), status(500), status(500))

    async def sleep(seconds: float) -> None:
        script.slept.append(seconds)
        clock.now += seconds

    # 100 s of refusals, then errors: the 25 s bound is for the errors alone.
    assert await policy(max_time=25.0, base=1.0, cap=1.0).call(script, sleep=sleep) == "ok"
    assert script.attempts == 13


async def test_a_refusal_that_names_no_time_backs_off() -> None:
    script = Script(status(429), status(429), status(429))
    assert await policy(max_attempts=1, base=0.1, cap=0.3).call(script, sleep=script.sleep) == "ok"
    for n, slept in enumerate(script.slept):
        assert 0 <= slept <= min(0.3, 0.1 * 2**n)


async def test_a_429_that_says_the_quota_is_spent_is_not_waited_for() -> None:
    spent = http_error(
        429,
        "You exceeded your current quota",
        body={"error": {"code": "insufficient_quota", "type": "insufficient_quota"}},
    )
    script = Script(spent)
    with pytest.raises(HTTPStatusError):
        await policy().call(script, sleep=script.sleep)
    assert (script.attempts, script.slept) == (1, [])


async def test_a_request_refused_for_longer_than_the_bound_fails_to_be_tried_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One model an aggregator cannot serve for now, while the others go: that request fails
    # (the next run tries it again) rather than hold the run forever.
    clock = Clock()
    monkeypatch.setattr(time, "monotonic", clock)
    script = Script(*(status(429, retry_after=60.0) for _ in range(100)))

    async def sleep(seconds: float) -> None:
        clock.now += seconds

    with pytest.raises(HTTPStatusError) as caught:
        await RetryPolicy(max_attempts=6, max_time=900, base=0.1, cap=30, max_refused=300).call(
            script, sleep=sleep
        )
    assert script.attempts == 6  # refused at 0, 60, ..., 300 s: the next wait would pass the bound
    assert "refused for 300s" in caught.value.message
    assert not caught.value.transient


async def test_a_429_for_a_request_too_large_for_the_limit_is_not_waited_for() -> None:
    # OpenAI: "Request too large for gpt-4o ... on tokens per min (TPM): Limit 30000, Requested 36858"
    too_large = http_error(
        429, "Request too large for gpt-4o on tokens per min (TPM): Limit 30000, Requested 36858."
    )
    script = Script(too_large)
    with pytest.raises(HTTPStatusError):
        await policy().call(script, sleep=script.sleep)
    assert (script.attempts, script.slept) == (1, [])


async def test_a_429_inside_a_200_is_a_refusal_too() -> None:
    upstream = provider_error(
        "provider error inside a 200 answer: rate limited upstream", code=429, body=None
    )
    script = Script(*(upstream for _ in range(8)))
    assert await policy(max_attempts=2).call(script, sleep=script.sleep) == "ok"
    assert script.attempts == 9


# -- what a server may say about waiting (pipeline.send.waits) -------------------------------------

NOW = 1_750_000_000.0  # the wall clock, in epoch seconds
DATE = email.utils.formatdate(NOW + 30, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        # not a wait: the retry policy backs off on its own (these ended the run, exit 70, or
        # retried at once without waiting)
        ({"retry-after": "inf"}, None),
        ({"retry-after": "1e400"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after-ms": "inf"}, None),
        ({"retry-after": "-5"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "soon"}, None),
        # a moment, as epoch seconds or milliseconds, in either header
        ({"retry-after": str(int(NOW) + 30)}, 30.0),
        ({"retry-after": str(int(NOW * 1000) + 1500)}, 1.5),
        ({"retry-after-ms": str(int(NOW * 1000) + 1500)}, 1.5),
        ({"retry-after-ms": str(int(NOW) + 30)}, 30.0),
        ({"retry-after": str(int(NOW * 1000) - 5000)}, 0.0),  # a moment past
        # HTTP dates: to come, past, without a zone
        ({"retry-after": DATE}, 30.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0),
        ({"retry-after": email.utils.formatdate(NOW + 60)[:-5] + "-0000"}, 60.0),
        # past a day: a day; several joined by a proxy: the longest
        ({"retry-after": "172800"}, DAY),
        ({"retry-after": "1e12"}, DAY),
        ({"retry-after": "5, 7"}, 7.0),
        ({"retry-after": "soon, 3"}, 3.0),
        ({"retry-after": f"{DATE}, {DATE}"}, 30.0),
        ({"retry-after": f"Wed, 21 Oct 2015 07:28:00 GMT, {DATE}"}, 30.0),
        # a retry-after-ms that says nothing leaves it to Retry-After
        ({"retry-after-ms": "nan", "retry-after": "2"}, 2.0),
    ],
)
def test_what_a_gateway_may_say_in_retry_after(headers: dict[str, str], wait: float | None) -> None:
    said = retry_after(headers, now=NOW)
    assert said == (None if wait is None else pytest.approx(wait, abs=0.01))


def test_retry_after_sent_twice_is_the_longer() -> None:
    headers = CIMultiDict([("Retry-After", "2"), ("Retry-After", "9")])
    assert retry_after(headers, now=NOW) == 9.0


@pytest.mark.parametrize(
    ("message", "wait"),
    [
        ("Please try again in 71ms.", 0.071),
        ("Please retry in 37.6s.", 37.6),  # Gemini's words
        ("try again in 20 seconds", 20.0),
        ("try again in 1 minute 30 seconds", 90.0),
        ("Please try again in 25h.", DAY),
        ("Please try again in " + "9" * 400 + "s.", None),  # infinite as a float
        ("try again later", None),
    ],
)
def test_what_a_refusal_may_say_in_its_message(message: str, wait: float | None) -> None:
    said = said_wait(message)
    assert said == (None if wait is None else pytest.approx(wait))
    error = error_for(429, {}, orjson.dumps({"error": {"message": message}}))
    assert error.retry_after == said


def test_an_error_message_nested_a_thousand_deep_is_said_short() -> None:
    deep = b"[" * 1000 + b"]" * 1000  # repr() of it raised RecursionError: a crash
    error = error_for(429, {"retry-after": "1"}, b'{"error": {"message": ' + deep + b"}}")
    assert error.refusal
    assert error.retry_after == 1.0
    assert len(error.message) < 400


@pytest.mark.parametrize(
    ("reset", "wait"),
    [
        ("6m0s", 360.0),
        (str(int(NOW * 1000) + 2000), 2.0),  # OpenRouter's reset: epoch milliseconds
        ("nan", None),
        ("-1", None),
        ("1e400", None),
        ("9999h", DAY),
    ],
)
def test_a_reset_time_as_servers_write_it(reset: str, wait: float | None) -> None:
    said = parse_duration(reset, now=NOW)
    assert said == (None if wait is None else pytest.approx(wait, abs=0.01))


def test_a_run_of_refusals_that_asks_for_days_stops_the_run_with_a_date() -> None:
    # Four refusals in a row asking for more than the give-up time: a quota spent. With
    # "Retry-After: 1e12" the stop message computed a date 31,000 years away: OverflowError.
    from pipeline.pace.finder import RateFinder
    from pipeline.pace.pacer import Pacer
    from pipeline.pace.window import Window

    class Clock:
        now = 1000.0

        def __call__(self) -> float:
            return self.now

    class Paused(Pacer):
        def _now(self) -> float:
            return 0.0

    stops: list[RunStopped] = []
    finder = RateFinder(Paused(), Window(8), clock=Clock(), give_up=600.0, stop=stops.append)
    tickets = [finder.sent() for _ in range(4)]
    for ticket in tickets:
        error = error_for(429, {"retry-after": "1e12"}, b"{}")
        finder.pushback(ticket, error.retry_after, error.message)
    [stop] = stops
    assert "it asks to wait 24h00m, until" in str(stop)


async def test_a_retry_after_no_wait_can_be_read_from_is_not_a_crash_nor_a_storm(
    make_settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A gateway answers four requests in a row 429 (the rate finder's run: the server is
    # full), each with a Retry-After no wait can be read from, then lets them through. "inf"
    # and "1e400" ended the run at once (exit 70, OverflowError in the give-up rule); "nan"
    # retried at once.
    from aiohttp import web

    import pipeline
    from pipeline.mock.answers import completion
    from pipeline.send import retry
    from tests.scripted import answering

    waits: list[tuple[float | None, float]] = []
    real = retry.refusal_wait

    def recorded(error: RequestError, refusals: int, *, base: float, cap: float) -> float:
        delay = real(error, refusals, base=base, cap=cap)
        waits.append((error.retry_after, delay))
        return delay

    monkeypatch.setattr(retry, "refusal_wait", recorded)
    said = ["inf", "1e400", "nan", "-1"]

    async def answer(request: web.Request, body: dict) -> web.Response:
        if said:
            headers = {"Retry-After": said.pop(0)}
            return web.json_response({"error": {"message": "busy"}}, status=429, headers=headers)
        return web.json_response(completion(body))

    rows = [
        {"custom_id": f"r{i}", "model": "m", "messages": [{"role": "user", "content": str(i)}]}
        for i in range(4)
    ]
    async with answering(answer) as url:
        summary = await pipeline.run(make_settings(url, rows, backoff_base=0.01, backoff_max=0.05))
    assert summary.exit_code == 0
    assert summary.succeeded == 4
    assert len(waits) == 4
    for wait, delay in waits:
        assert wait is None  # nothing read from it: our own backoff, jittered and bounded
        assert 0.0 <= delay <= 0.05


async def test_a_retry_after_in_epoch_milliseconds_is_waited_until(make_settings, monkeypatch) -> None:
    import time as clock

    from aiohttp import web

    import pipeline
    from pipeline.mock.answers import completion
    from pipeline.send import retry
    from tests.scripted import answering

    waits: list[float | None] = []
    real = retry.refusal_wait
    monkeypatch.setattr(
        retry, "refusal_wait", lambda error, *a, **k: waits.append(error.retry_after) or real(error, *a, **k)
    )
    refused = 0

    async def answer(request: web.Request, body: dict) -> web.Response:
        nonlocal refused
        if refused < 4:
            refused += 1
            until = str(int(clock.time() * 1000) + 200)  # 0.2 s from now, in epoch milliseconds
            return web.json_response(
                {"error": {"message": "busy"}}, status=429, headers={"Retry-After": until}
            )
        return web.json_response(completion(body))

    rows = [
        {"custom_id": f"r{i}", "model": "m", "messages": [{"role": "user", "content": str(i)}]}
        for i in range(4)
    ]
    async with answering(answer) as url:
        summary = await pipeline.run(make_settings(url, rows))
    assert (summary.exit_code, summary.succeeded) == (0, 4)
    assert len(waits) == 4
    for said in waits:
        assert said is not None
        assert 0.0 < said <= 0.2  # not 1.7e12 seconds
