"""The retry policy on its own, with a sleep that records instead of waiting."""

from __future__ import annotations

import time

import pytest

from pipeline.errors import ConnectionDropped, HTTPStatusError, RequestError
from pipeline.send.retry import RetryPolicy
from pipeline.send.status import http_error, provider_error


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
