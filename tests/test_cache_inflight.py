"""Within one run, identical requests in flight at once are sent once: the others take the
first's answer; when the first fails (or is abandoned), the next is sent itself."""

from __future__ import annotations

import anyio
import pytest

from pipeline.cache.inflight import Inflight

KEY = b"k" * 32


class Sender:
    """Sends held until the test lets them go, each then answering what the test says."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.go = anyio.Event()
        self.answers: list[str | None] = []

    def send(self, name: str):  # type: ignore[no-untyped-def]
        async def go() -> str | None:
            self.sent.append(name)
            await self.go.wait()
            return self.answers.pop(0)

        return go


async def test_requests_alike_in_flight_at_once_are_sent_once() -> None:
    inflight: Inflight[str] = Inflight()
    sender = Sender()
    sender.answers = ["answer"]
    results: dict[str, tuple[str | None, bool]] = {}

    async def one(name: str, key: bytes = KEY) -> None:
        results[name] = await inflight.once(key, sender.send(name))

    async with anyio.create_task_group() as tg:
        for name in ("first", "second", "third"):
            tg.start_soon(one, name)
        await anyio.wait_all_tasks_blocked()
        assert inflight.waiting(KEY) == 2
        sender.go.set()
    assert sender.sent == ["first"]
    assert results == {"first": ("answer", False), "second": ("answer", True), "third": ("answer", True)}
    assert inflight.shared == 2
    assert len(inflight) == 0


async def test_when_the_first_fails_the_next_is_sent_and_the_rest_take_its_answer() -> None:
    inflight: Inflight[str] = Inflight(shareable=lambda outcome: outcome is not None and outcome != "failed")
    sender = Sender()
    sender.answers = ["failed", "answer"]
    results: dict[str, tuple[str | None, bool]] = {}

    async def one(name: str) -> None:
        results[name] = await inflight.once(KEY, sender.send(name))

    async with anyio.create_task_group() as tg:
        for name in ("first", "second", "third"):
            tg.start_soon(one, name)
        await anyio.wait_all_tasks_blocked()
        sender.go.set()
    assert sender.sent == ["first", "second"]  # the failure is handed to no one
    assert results == {"first": ("failed", False), "second": ("answer", False), "third": ("answer", True)}


async def test_a_first_cancelled_leaves_the_next_to_be_sent() -> None:
    inflight: Inflight[str] = Inflight()
    sender = Sender()
    sender.answers = ["answer"]
    results: dict[str, tuple[str | None, bool]] = {}

    scopes: list[anyio.CancelScope] = []

    async def first() -> None:
        with anyio.CancelScope() as scope:
            scopes.append(scope)
            await inflight.once(KEY, sender.send("first"))

    async def second() -> None:
        results["second"] = await inflight.once(KEY, sender.send("second"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        assert sender.sent == ["first"]
        scopes[0].cancel()  # (the run abandoned it)
        await anyio.wait_all_tasks_blocked()
        sender.go.set()
    assert sender.sent == ["first", "second"]
    assert results == {"second": ("answer", False)}


async def test_different_requests_do_not_wait_on_each_other() -> None:
    inflight: Inflight[str] = Inflight()
    sender = Sender()
    sender.answers = ["a", "b"]

    async with anyio.create_task_group() as tg:
        tg.start_soon(inflight.once, b"a" * 32, sender.send("a"))
        tg.start_soon(inflight.once, b"b" * 32, sender.send("b"))
        await anyio.wait_all_tasks_blocked()
        assert sender.sent == ["a", "b"]
        sender.go.set()


@pytest.mark.parametrize("error", [ValueError, KeyError])
async def test_a_send_that_raises_wakes_the_waiters(error: type[Exception]) -> None:
    inflight: Inflight[str] = Inflight()
    calls: list[str] = []
    gate = anyio.Event()

    async def raising() -> str | None:
        calls.append("first")
        await gate.wait()
        raise error("boom")

    async def fine() -> str | None:
        calls.append("second")
        return "answer"

    results: list[tuple[str | None, bool]] = []

    async def first() -> None:
        with pytest.raises(error):
            await inflight.once(KEY, raising)

    async def second() -> None:
        results.append(await inflight.once(KEY, fine))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        gate.set()
    assert calls == ["first", "second"]
    assert results == [("answer", False)]


async def test_a_key_failing_twice_sends_its_waiters_at_once() -> None:
    inflight: Inflight[str] = Inflight(shareable=lambda outcome: outcome != "failed")
    sender = Sender()
    sender.answers = ["failed"] * 5
    results: dict[str, tuple[str | None, bool]] = {}

    async def one(name: str) -> None:
        results[name] = await inflight.once(KEY, sender.send(name))

    async with anyio.create_task_group() as tg:
        for name in ("1", "2", "3", "4", "5"):
            tg.start_soon(one, name)
        await anyio.wait_all_tasks_blocked()
        assert sender.sent == ["1"]
        sender.go.set()
        sender.go = anyio.Event()  # (the second is held: sent alone)
        await anyio.wait_all_tasks_blocked()
        assert sender.sent == ["1", "2"]
        held, sender.go = sender.go, anyio.Event()  # (the rest are held too: are they all sent?)
        held.set()
        await anyio.wait_all_tasks_blocked()
        assert sorted(sender.sent) == ["1", "2", "3", "4", "5"]  # the rest at once, not one by one
        sender.go.set()
    assert all(result == ("failed", False) for result in results.values())
    assert len(inflight) == 0
