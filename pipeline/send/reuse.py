"""Answers reused (issue 23, point 2): what `pipeline.send.attempts` asks of the answer cache.

    key     the request as sent (images filled in), scoped by the endpoint's base URL, so that
            answers kept against the mock are never served for a real provider's
    taken   a kept answer as the request's `Success`, marked reused, when it still keeps the
            job's verdict (one that fails it is sent again, as if never kept)
    shared  another request's answer in flight now, as this request's `Success`, reused
    keep    an answer that passed the verdict, queued for the cache with what it cost, at
            the tier that bought it (the writer's checkpoint flushes it: `flush_if_due`)

A reused result is neither sent nor paid: the writer counts it as reused, with the dollars it
cost when bought (`Books.kept`), apart from what this run paid. At the batch tier, the same
cache is asked before a line is staged (`pipeline.batch.stage`), and the answers batches
bring are kept at the batch price (`pipeline.batch.intake`); `--then sync`'s requests come
through `process`, kept at the synchronous price.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import orjson

from pipeline.account.cost import answer_cost
from pipeline.cache.inflight import Inflight
from pipeline.cache.key import request_key
from pipeline.cache.store import Answer, AnswerCache
from pipeline.errors import InvalidOutput
from pipeline.input import jsonl
from pipeline.job import Outcome, Reply, Request, SentNow, Success
from pipeline.prices import Price
from pipeline.run.control import Seat
from pipeline.send.verdict import Verdict
from pipeline.urls import redacted


def scope_of(base_url: str) -> str:
    """What answers are kept under beside the request: the endpoint, its secrets out (answers
    kept against one server are never served for another's requests)."""
    return redacted(base_url).rstrip("/")


def _shareable(outcome: Outcome | None) -> bool:
    return isinstance(outcome, Success)


class Reuse:
    """One run's use of the answer cache at `folder`."""

    def __init__(
        self,
        folder: Path,
        *,
        scope: str,
        prices: Mapping[str, Price],
        now_prices: Mapping[str, Price] | None = None,
        max_gb: float | None = None,
        warn: Callable[[str], None],
    ) -> None:
        self.cache = AnswerCache(folder, max_gb=max_gb, warn=warn)
        self.scope = scope
        self.prices = prices  # the run's tier's
        self.now_prices = now_prices  # at the batch tier, the synchronous ones (`SentNow`)
        self.inflight: Inflight[Outcome] = Inflight(_shareable)

    async def process(
        self,
        request: Request,
        seat: Seat | None,
        verdict: Verdict | None,
        sent: Callable[[Request, Seat | None], Awaitable[Outcome | None]],
        *,
        read: bool = True,
    ) -> Outcome | None:
        """The kept answer of the same request (the key made after the images are filled in);
        else the answer of the same request in flight now, waited for out of the crew; else
        the request `sent`, its answer kept (it passed the verdict, or it would have failed).
        `read` False: a new answer is wanted (a --redo): sent, and kept in place of the old."""
        key = self.key(request)
        if not read:
            outcome = await sent(request, seat)
            if isinstance(outcome, Success):
                self.cache.reject(key)  # (the newer answer replaces the kept one)
                self.keep(key, outcome)
            return outcome
        hit = self.taken(request, key, verdict)
        if hit is not None:
            return hit
        # A request that waits for another's answer holds no seat: the crew's seats are for
        # requests in flight. It takes one back (over the size, as after a backoff) when it
        # is sent after all, or when the answer comes.
        out = seat is not None and key in self.inflight and seat.step_out()

        async def send() -> Outcome | None:
            nonlocal out
            if out:
                assert seat is not None
                seat.rejoin()
                out = False
            return await sent(request, seat)

        try:
            outcome, shared = await self.inflight.once(key, send)
        finally:
            if out:
                assert seat is not None
                seat.rejoin()
        if shared:
            assert outcome is not None  # (only a Success is shared)
            return self.shared(request, outcome)
        if isinstance(outcome, Success):
            self.keep(key, outcome)
        return outcome

    def key(self, request: Request) -> bytes:
        return request_key(request.payload, scope=self.scope)

    def taken(self, request: Request, key: bytes, verdict: Verdict | None) -> Success | None:
        """The kept answer of `key` as the request's result, or None (none kept, unreadable,
        or failing the job's verdict now: then the request is sent)."""
        answer = self.cache.get(key)
        if answer is None:
            return None
        try:
            body = orjson.loads(answer.body)
        except orjson.JSONDecodeError:
            body = None
        if not isinstance(body, dict):
            self.cache.reject(key)
            return None
        reply = Reply(body, answer.body)
        parsed: Any = None
        label = None
        if verdict is not None:
            try:
                parsed = verdict.check(body)
            except InvalidOutput:
                self.cache.reject(key)  # (the answer sent now, if it keeps the verdict, replaces it)
                return None
            label = verdict.label(parsed)
        return Success(request, reply, 0, parsed, label, True, answer.cost)

    @staticmethod
    def shared(request: Request, outcome: Outcome) -> Success:
        """Another request's answer, of the same key, as this one's."""
        assert isinstance(outcome, Success)
        return Success(request, outcome.reply, 0, outcome.parsed, outcome.label, True)

    def keep(self, key: bytes, success: Success, *, tier: str = "sync") -> None:
        """Queue an answer bought now (it kept the verdict) to be kept, with what it cost:
        `tier` "batch", an answer a batch brought, at the run's (batch) prices."""
        request = success.request
        reply, model = success.reply, request.model or ""
        prices = self.prices
        if self.now_prices is not None and type(request) is SentNow:  # (--then sync's: bought now)
            prices, tier = self.now_prices, "sync"
        cost, _ = answer_cost(reply.body, prices, request.model)
        self.cache.put(key, Answer(reply.raw or jsonl.dumps(reply.body), model, cost, tier))

    async def flush_if_due(self) -> None:
        """Write the queued answers, in a thread (another process may hold the file a moment)."""
        if self.cache.due:
            await anyio.to_thread.run_sync(self.cache.flush)

    def close(self) -> None:
        self.cache.close()
