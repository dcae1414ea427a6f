"""The built-in mock's ways of counting limits, as a client meets them over HTTP: each model's
limits beside the account's, limits that move, a bucket's capacity, and the ways a 429 says
its wait. The mock's limits read a fake clock here, so nothing waits."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiohttp
import pytest

from pipeline import cli
from pipeline.mock.admission import in_words

PAID, FREE = "vendor/paid", "vendor/model:free"


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def body(model: str = PAID, *, max_tokens: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "hello"}]}
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    return out


class Client:
    """What a client sees of each request: the status, the headers, the error's message."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url, self.session = url, session

    async def send(self, model: str = PAID, **kw: Any) -> tuple[int, dict[str, str], str]:
        async with self.session.post(f"{self.url}/chat/completions", json=body(model, **kw)) as r:
            doc = await r.json()
            message = doc["error"]["message"] if r.status != 200 else ""
            return r.status, {k.lower(): v for k, v in r.headers.items()}, message

    async def statuses(self, n: int, model: str = PAID, **kw: Any) -> list[int]:
        return [(await self.send(model, **kw))[0] for _ in range(n)]


@pytest.fixture
def client(mock: Any) -> Callable[..., AbstractAsyncContextManager[tuple[Client, Any]]]:
    """`async with client(**mock_config) as (c, server)`: the mock, on a fake clock unless
    `clock=` is given, and a client of it."""

    @asynccontextmanager
    async def started(**config: Any) -> AsyncIterator[tuple[Client, Any]]:
        config.setdefault("clock", Clock())
        async with mock(record=False, **config) as (url, server), aiohttp.ClientSession() as session:
            yield Client(url, session), server

    return started


# -- each model's limits ------------------------------------------------------------------------


async def test_a_models_limit_refuses_its_requests_only_and_names_the_model(client: Any) -> None:
    async with client(rpm=600, model_rpm={FREE: 120}) as (c, server):  # 10 a second; 2 for FREE
        assert await c.statuses(3, FREE) == [200, 200, 429]
        status, headers, message = await c.send(FREE)
        assert status == 429
        assert f"Rate limit reached for model {FREE}" in message
        assert "retry-after" in headers
        # The paid model's requests in the same second go through, up to the account's 10...
        assert await c.statuses(9, PAID) == [200] * 8 + [429]
        # ...whose refusal names no model: FREE's two refusals never reached the account's count.
        _, _, message = await c.send(PAID)
        assert message == "Rate limit reached for requests"
        stats = server.state.stats()
    assert stats["models"][FREE] == {
        "accepted": 2,
        "refused": 2,
        "accepted_per_second": {"1000": 2},
        "first_accepted": 1000.0,
        "last_accepted": 1000.0,
    }
    assert stats["models"][PAID]["accepted"] == 8
    assert stats["models"][PAID]["refused"] == 2


async def test_a_limit_under_one_a_second_counted_per_second_lets_one_through_every_few(
    client: Any,
) -> None:
    # OpenRouter's :free models allow 20 a minute: one request every third second.
    clock = Clock(999.0)
    async with client(model_rpm={FREE: 20}, clock=clock) as (c, server):
        for _ in range(9):
            clock.now += 1
            await c.statuses(2, FREE)
        stats = server.state.stats()
    assert stats["models"][FREE]["accepted"] == 3
    assert set(stats["models"][FREE]["accepted_per_second"].values()) == {1}


async def test_a_request_the_account_refuses_does_not_count_against_its_model(client: Any) -> None:
    # One request a minute for the account, two for FREE, each a bucket holding a minute.
    async with client(rpm=1, model_rpm={FREE: 2}, limit_style="bucket") as (c, _):
        assert await c.statuses(1, PAID) == [200]
        for _ in range(3):  # the account is full: FREE's own bucket is left as it was
            _, _, message = await c.send(FREE)
            assert message.startswith("Rate limit reached for requests.")


async def test_a_models_token_limit_counts_on_arrival_what_the_request_may_use(client: Any) -> None:
    # 100 tokens a second for FREE, counting the prompt and max_tokens as the request arrives.
    async with client(model_tpm={FREE: 6000}, tpm_count="arrival") as (c, _):
        assert (await c.send(FREE, max_tokens=60))[0] == 200
        status, _, message = await c.send(FREE, max_tokens=60)
        assert (status, message) == (429, f"Rate limit reached for model {FREE} on tokens")
        assert await c.statuses(5, PAID, max_tokens=60) == [200] * 5


async def test_tokens_in_a_bucket_refill_continuously(client: Any) -> None:
    # 100 tokens a second, one second of them held: a request of ~70 tokens (on arrival), then
    # the next when the bucket has refilled what it lacks.
    clock = Clock()
    async with client(
        tpm=6000, tpm_count="arrival", limit_style="bucket", bucket_capacity=1, clock=clock
    ) as (
        c,
        _,
    ):
        assert await c.statuses(2, max_tokens=60) == [200, 429]
        clock.now += 0.3
        assert await c.statuses(1, max_tokens=60) == [429]
        clock.now += 0.5
        assert await c.statuses(2, max_tokens=60) == [200, 429]


# -- a bucket's capacity ------------------------------------------------------------------------


async def test_a_bucket_holds_the_seconds_of_its_rate_it_is_given(client: Any) -> None:
    clock = Clock()
    async with client(rpm=600, limit_style="bucket", bucket_capacity=1, clock=clock) as (c, _):
        assert await c.statuses(11) == [200] * 10 + [429]  # one second's 10 at once
        clock.now += 0.1
        assert await c.statuses(2) == [200, 429]  # then one every 0.1 s
    async with client(rpm=60, limit_style="bucket") as (c, _):  # a minute's, by default
        assert set(await c.statuses(60)) == {200}
        assert await c.statuses(1) == [429]


# -- how a 429 says its wait --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("way", "said", "in_message"),
    [
        ("exact", {"retry-after": "0.750"}, None),
        ("seconds", {"retry-after": "1"}, None),
        ("ms", {"retry-after": "1", "retry-after-ms": "750"}, None),
        ("message", {}, "Please try again in 750ms."),
        ("none", {}, None),
    ],
)
async def test_each_way_of_saying_the_wait(
    client: Any, way: str, said: dict[str, str], in_message: str | None
) -> None:
    # One request a second; the second one 0.25 s into the second waits 0.75 s.
    async with client(rpm=60, wait_said=way, clock=Clock(1000.25)) as (c, _):
        assert (await c.send())[0] == 200
        status, headers, message = await c.send()
    assert status == 429
    assert {k: v for k, v in headers.items() if k in ("retry-after", "retry-after-ms")} == said
    if in_message is None:
        assert "try again" not in message
    else:
        assert message.endswith(in_message)


async def test_a_bucket_says_its_wait_in_its_message_unless_told_otherwise(client: Any) -> None:
    # 40 a minute, one held: the next in 1.5 s.
    async with client(rpm=40, limit_style="bucket", bucket_capacity=1.5) as (c, _):
        assert (await c.send())[0] == 200
        status, headers, message = await c.send()
    assert (status, "retry-after" in headers) == (429, False)
    assert message == "Rate limit reached for requests. Please try again in 1.5s."
    async with client(rpm=40, limit_style="bucket", bucket_capacity=1.5, wait_said="seconds") as (c, _):
        await c.send()
        _, headers, _ = await c.send()
    assert headers["retry-after"] == "2"  # 1.5 s, rounded up


def test_a_wait_in_words_is_rounded_up_as_openai_writes_it() -> None:
    assert [in_words(w) for w in (0.0704, 0.999, 1.0, 1.2, 6.6661)] == [
        "71ms",
        "999ms",
        "1s",
        "1.2s",
        "6.667s",
    ]


# -- limits that move ---------------------------------------------------------------------------


async def test_a_limit_moves_at_its_times_after_the_first_request(client: Any) -> None:
    clock = Clock(1000.0)
    changes = (("", 10.0, 180.0), ("", 20.0, 60.0), (FREE, 10.0, 120.0))
    async with client(rpm=60, model_rpm={FREE: 60}, limit_changes=changes, clock=clock) as (c, server):
        clock.now = 1005.0  # the first request starts the schedule, not the mock
        assert await c.statuses(2) == [200, 429]
        clock.now = 1014.0  # 9 s after it: not yet
        assert await c.statuses(2) == [200, 429]
        clock.now = 1015.0  # 10 s: 3 a second, FREE 2
        assert await c.statuses(2, FREE) == [200, 200]
        assert await c.statuses(2) == [200, 429]
        clock.now = 1025.5  # 20 s: 1 a second again, FREE still 2
        assert await c.statuses(2, FREE) == [200, 429]
        stats = server.state.stats()
    assert stats["first_request"] == 1005.0
    assert stats["accepted_per_second"] == {"1005": 1, "1014": 1, "1015": 3, "1025": 1}


def test_a_limit_change_needs_a_limit_to_change(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["mock", "--port", "0", "--limit-changes", "40=1200"]) == 2
    assert "needs --rpm" in capsys.readouterr().err
    assert cli.main(["mock", "--port", "0", "--rpm", "60", "--limit-changes", f"{FREE}:4=1"]) == 2
    assert f"--limit-changes for {FREE} needs --model-rpm" in capsys.readouterr().err
