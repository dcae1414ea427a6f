"""One request's attempts, to exactly one outcome, in four steps, each owned by one module:

    pace     `pipeline.pace.gate`: wait for a slot in flight and a start time; tell the pace
             how the attempt ended
    send     `pipeline.send.client`: one attempt, its answer read whole
    judge    `pipeline.send.status` (what a failed answer means), `pipeline.send.verdict` (does
             the answer keep the job's contract), `pipeline.send.retry` (try again, when)
    account  `pipeline.account.books`: every attempt, every answer billed, the budget

A request that ends failed is a `Failure` for the writer; a request the run abandoned
(interrupted, key rejected, budget reached) produces nothing and stays to do for the next run.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from pipeline.account.books import Books
from pipeline.account.usage import answer_tokens, reports_usage
from pipeline.errors import InputError, InvalidOutput, RequestError, RunStopped
from pipeline.input.reader import input_failure
from pipeline.job import Failure, Outcome, Reply, Request, SentNow, Success
from pipeline.pace.gate import Gate, GivenUp
from pipeline.run.control import Control, Seat
from pipeline.send.client import Client
from pipeline.send.notfound import Undecided
from pipeline.send.retry import RetryPolicy
from pipeline.send.status import Judge, answer_key
from pipeline.send.verdict import Verdict

if TYPE_CHECKING:  # (imported by the runner where a run has a cache: runs without one skip it)
    from pipeline.send.reuse import Reuse


class Abandoned(Exception):
    """The run stopped dispatching before this attempt could start."""


class _Tries:
    """One request's attempts: how many were sent, how many answers broke the verdict, and
    whether one thrown away was billed (then another must still fit the budget)."""

    __slots__ = ("before", "billed", "invalid", "owner", "request", "seat", "sent")

    def __init__(self, owner: Attempts, request: Request, seat: Seat | None) -> None:
        self.owner, self.request, self.seat = owner, request, seat
        # A line a batch left undone (`--then sync`) counts on from the tries its batches spent.
        self.sent, self.invalid = _spent(request), request.broke if type(request) is SentNow else 0
        self.before = self.sent  # tries spent before this request's
        self.billed = False

    async def attempt(self) -> tuple[Reply, Any]:
        """One more attempt, for the retry policy."""
        owner = self.owner
        if self.billed:
            owner._stop_if(owner.books.covers_another_answer())
        try:
            reply = await owner._attempt(self.request, self.seat)
        except RequestError as e:
            self.failed(e)
            raise
        return reply, self.judged(reply)

    def failed(self, error: RequestError) -> None:
        """An attempt was sent, and failed."""
        self.sent += 1
        self.billed = self.billed or reports_usage(error.body)

    def judged(self, reply: Reply) -> Any:
        """An attempt was answered: the answer's parsed verdict, or `InvalidOutput`."""
        self.sent += 1
        owner = self.owner
        if owner.verdict is None:
            return None
        try:
            return owner._judge(reply, self.request)
        except InvalidOutput as e:
            self.invalid += 1
            self.billed = True
            e.transient = owner.verdict is not None and self.invalid < owner.verdict.max_attempts
            raise


class Attempts:
    """Turns one request into its one outcome: pace, send, judge, account, and again as the
    retry policy says."""

    def __init__(
        self,
        *,
        gate: Gate,
        client: Client,
        judge: Judge,
        retry: RetryPolicy,
        books: Books,
        control: Control,
        verdict: Verdict | None = None,
        reuse: Reuse | None = None,
        fresh: Callable[[str], bool] | None = None,
    ) -> None:
        self.reuse = reuse  # the answer cache, where the run has one
        self.fresh = fresh  # the ids a --redo chose: a new answer asked for, not the cache's
        self.gate = gate
        self.client = client
        self.judge = judge
        self.retry = retry
        self.books = books
        self.control = control
        self.verdict = verdict
        # Decoding and resizing images: a few threads, as many as there are cores to run them.
        self._image_threads = anyio.CapacityLimiter(max(2, os.cpu_count() or 2))

    async def process(self, request: Request, seat: Seat | None = None, ask: bool = True) -> Outcome | None:
        """The request's attempts, to its outcome. Most requests succeed at the first: it is
        made here, and the retry policy is called only for the others (no coroutine of its
        own, nor of the policy's, to go through at every wait of the attempt). `ask`: False
        where the answer cache was asked already and sends it (`_sent`: one coroutine a
        request, with a cache or without)."""
        if ask:
            if request.images is not None:
                failure = await self.fill(request)
                if failure is not None:
                    return failure
            if self.reuse is not None:
                read = self.fresh is None or not self.fresh(request.custom_id)
                return await self.reuse.process(request, seat, self.verdict, self._sent, read=read)
        said = self.judge.gone(request.model)
        if said is not None:
            return self._unsent(request, said)
        # (no coroutine made where there is no budget to wait for: most runs have none)
        held = await self.books.reserve(request) if self.books.budget is not None else None
        if isinstance(held, RunStopped):
            self.control.stop(held)
            return None
        self.control.in_hand += 1
        # (made for the second attempt, or a verdict, where it is needed: most need none)
        tries: _Tries | None = None
        try:
            started = time.monotonic()
            failed: RequestError | None = None
            parsed = None
            try:
                reply = await self._attempt(request, seat)
            except RequestError as e:
                tries = _Tries(self, request, seat)
                tries.failed(e)
                failed = e
            else:
                if self.verdict is not None:
                    tries = _Tries(self, request, seat)
                    try:
                        parsed = tries.judged(reply)
                    except InvalidOutput as e:
                        failed = e
            if failed is not None:
                assert tries is not None  # (made with the failure)
                sleep = seat.backoff if seat else self.control.nap
                try:
                    reply, parsed = await self.retry.call(
                        tries.attempt, sleep=sleep, failed=failed, started=started, spent=tries.before
                    )
                finally:
                    del failed  # (its traceback holds this frame: a cycle, and the answer's body kept)
        except Abandoned:
            return None
        except GivenUp as e:
            return self._refused(request, tries.sent if tries is not None else _spent(request), str(e))
        except RequestError as e:
            assert tries is not None  # (a RequestError of the first attempt made it)
            return await self._failed(request, tries, e)
        finally:
            self.control.in_hand -= 1
            if held is not None:
                self.books.release(held)
            self.judge.ended()  # a 404's verdict may wait for every other request in hand to end
        if tries is None:  # (one attempt, no verdict: most requests)
            return Success(request, reply, 1 if type(request) is not SentNow else 1 + request.spent)
        label = self.verdict.label(parsed) if self.verdict is not None else None
        return Success(request, reply, tries.sent, parsed, label)  # (positional: half the time of keywords)

    def _sent(self, request: Request, seat: Seat | None) -> Awaitable[Outcome | None]:
        """The request sent, the answer cache asked already (a kept answer, or one in flight)."""
        return self.process(request, seat, False)

    async def _failed(self, request: Request, tries: _Tries, e: RequestError) -> Failure | None:
        """The request's last attempt failed: its `Failure`, or None where the run stops
        for it (or stopped before a 404 could be judged)."""
        try:
            stop = await self.judge.stops_run(e, request.model)
        except Undecided:
            return None
        if stop is not None:
            self.control.stop(stop)
            return None
        return Failure(
            line=request.line,
            code=e.code,
            message=e.message,
            custom_id=request.custom_id,
            status=e.status,
            body=e.body,
            request_id=e.request_id,
            attempts=tries.sent,
            metadata=request.metadata,
            model=request.model,
        )

    def _unsent(self, request: Request, said: str) -> Failure:
        """A line of a model the server said it does not serve: failed without a request, to
        be tried again by the next run like any failure."""
        return Failure(
            line=request.line,
            code="model_not_found",
            message=f"not sent: the server does not serve model {request.model} (it answered: {said})",
            custom_id=request.custom_id,
            attempts=_spent(request),
            metadata=request.metadata,
            model=request.model,
            unsent=True,
        )

    def _refused(self, request: Request, attempts: int, said: str) -> Failure:
        """A line of a model given up for this run: failed, to be tried again by the next."""
        return Failure(
            line=request.line,
            code="rate_limited",
            message=f"not sent: {said}",
            custom_id=request.custom_id,
            attempts=attempts,
            metadata=request.metadata,
            model=request.model,
            unsent=True,
        )

    async def fill(self, request: Request) -> Failure | None:
        """Read, size and encode the request's local images, in threads, into its payload:
        as late as can be, so that the read-ahead buffer holds records, not images. A broken
        image fails its line as an input error, and the run goes on."""
        from pipeline.input.imagedata import encode  # (only a job with local images comes here)

        images, request.images = request.images or [], None
        payload = request.payload
        try:
            for image in images:
                url, read, sent = await anyio.to_thread.run_sync(encode, image, limiter=self._image_threads)
                payload = payload.replace(image.marker, url, 1)
                self.books.image(read, sent)
        except InputError as e:
            return input_failure(e, line=request.line, custom_id=request.custom_id, metadata=request.metadata)
        request.payload = payload
        return None

    async def _attempt(self, request: Request, seat: Seat | None = None) -> Reply:
        """Pace, send, and account for one attempt; the answer, or the error it ended with."""
        control = self.control
        if not control.dispatching:
            raise Abandoned
        # (raises GivenUp when the request's model lets nothing through)
        slot = await self.gate.enter(request.token_estimate, request.model, seat)  # pace
        if not control.dispatching:
            slot.unused()
            raise Abandoned
        slot.go(request.custom_id)
        self.books.started()
        control.in_flight += 1
        try:
            reply = await self.client.complete(request)  # send
        except RequestError as e:
            slot.failed(e)
            self.judge.failed(e)
            self.books.attempt(answer_key(e))  # account
            stop = self.books.thrown_away(e.body, request)  # billed, though no result comes of it
            if stop is not None:
                self.control.stop(stop)
            raise
        finally:
            control.in_flight -= 1
        # (what it used counts only against tokens reserved: most requests reserve none)
        used = answer_tokens(reply.body)[2] if any(slot.reserved) else 0
        slot.answered(reply.latency, reply.limits, used)
        self.judge.success()
        stop = self.books.billed(reply.body, request)  # account: billed, kept or not
        if stop is not None:
            self.control.stop(stop)  # after this answer, which is paid for and kept
        return reply

    def _judge(self, reply: Reply, request: Request) -> Any:
        """Does the answer keep the job's contract? Its parsed verdict, or `InvalidOutput`."""
        parsed = None
        if self.verdict is not None:
            try:
                parsed = self.verdict.check(reply.body)
            except InvalidOutput as e:
                # Paid for, so counted, though no result comes of it.
                self.books.attempt(e.code)
                self.books.discarded(reply.body, request)
                e.body, e.request_id = reply.body, reply.request_id
                raise
        return parsed  # (its "200" counted by the writer, with the batch it arrives in)

    def _stop_if(self, stop: RunStopped | None) -> None:
        if stop is not None:
            self.control.stop(stop)
            raise Abandoned


def _spent(request: Request) -> int:
    """The tries a request's line spent before it was sent now: in batches, where `--then
    sync` sends what a batch left undone (`SentNow.spent`); none for any other request."""
    return request.spent if type(request) is SentNow else 0
