"""A worker takes requests one at a time and turns each into exactly one outcome.

Before every attempt: is the run still dispatching, then the pacer. Around every attempt:
the retry policy. A request that ends failed is a `Failure` for the writer; a request the run
abandoned (interrupted, key rejected, budget reached) produces nothing and stays to do for
the next run.
"""

from __future__ import annotations

from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.adaptive import RateFinder
from pipeline.client import Client
from pipeline.control import Control, Crew, Refill, Seat
from pipeline.cost import Budget, money
from pipeline.errors import HTTPStatusError, InvalidOutput, RequestError, RunStopped
from pipeline.job import Failure, Outcome, Reply, Request, Success
from pipeline.limits import Pacer, Window
from pipeline.retry import RetryPolicy
from pipeline.usage import Usage, answer_tokens
from pipeline.verdict import Verdict

# A 403 can be about one request (a moderation refusal) or about the key; only a streak
# of them, with nothing succeeding in between, says the key is refused.
FORBIDDEN_STREAK = 5


class Abandoned(Exception):
    """The run stopped dispatching before this attempt could start."""


def _refused_content(body: Any) -> bool:
    """A 403 that refuses the request's content (OpenRouter's moderation: `flagged_input`
    and `reasons` in the error's metadata), not the key."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return False
    metadata = error.get("metadata")
    if isinstance(metadata, dict) and ("flagged_input" in metadata or "reasons" in metadata):
        return True
    message = str(error.get("message", "")).lower()
    return "moderation" in message or "flagged" in message


def answer_key(error: RequestError) -> str:
    return str(error.status) if isinstance(error, HTTPStatusError) else error.code


class Worker:
    def __init__(
        self,
        *,
        client: Client,
        retry: RetryPolicy,
        pacer: Pacer,
        window: Window,
        finder: RateFinder,
        control: Control,
        usage: Usage,
        budget: Budget | None = None,
        verdict: Verdict | None = None,
    ) -> None:
        self.budget = budget
        self.verdict = verdict
        self.client = client
        self.retry = retry
        self.pacer = pacer
        self.window = window
        self.finder = finder
        self.control = control
        self.usage = usage

    async def run(
        self,
        requests: MemoryObjectReceiveStream[Request],
        outcomes: MemoryObjectSendStream[Outcome],
        crew: Crew,
        refill: Refill | None = None,
    ) -> None:
        seat = Seat(crew, self.control)
        # The *_nowait calls skip a trip round the event loop when there is no need to
        # wait; the awaiting calls are there for when there is.
        async with requests, outcomes:
            await seat.take()
            try:
                while self.control.dispatching:
                    await seat.make_room()
                    try:
                        request = requests.receive_nowait()
                    except anyio.WouldBlock:
                        try:
                            request = await requests.receive()
                        except anyio.EndOfStream:
                            break
                    except anyio.EndOfStream:
                        break
                    if refill is not None and refill.owed:
                        refill.taken()
                    outcome = await self.process(request, seat)
                    request.payload = b""  # sent for good: let a big body (images) go
                    if outcome is None:
                        continue
                    try:
                        outcomes.send_nowait(outcome)
                    except anyio.WouldBlock:
                        # Paid for: the writer must get it even if the run is being cancelled.
                        with anyio.CancelScope(shield=True):
                            await outcomes.send(outcome)
            finally:
                seat.give_up()

    async def process(self, request: Request, seat: Seat | None = None) -> Outcome | None:
        budget = self.budget
        if budget is None:
            return await self._process(request, seat)
        reservation = await budget.reserve(request)
        if reservation is None:
            self._stop_for_budget()
            return None
        try:
            return await self._process(request, seat)
        finally:
            budget.release(reservation)

    async def _process(self, request: Request, seat: Seat | None) -> Outcome | None:
        attempts = invalid = 0
        control, pacer, usage = self.control, self.pacer, self.usage

        async def attempt() -> tuple[Reply, Any]:
            nonlocal attempts, invalid
            if not control.dispatching:
                raise Abandoned
            if invalid and self.budget is not None and not self.budget.covers_another_answer():
                # The answer thrown away was billed: another try must still fit the cap.
                self._stop_for_budget()
                raise Abandoned
            reserved = request.token_estimate if pacer.token_rate else 0
            # A slot in flight first, then the start time: so a paced start is not spent
            # waiting for a slot.
            await self.window.acquire()
            try:
                await pacer.acquire(reserved)
                if not control.dispatching:
                    pacer.settle(reserved, 0)
                    raise Abandoned
                attempts += 1
                ticket = self.finder.sent()
                control.in_flight += 1
                try:
                    reply = await self.client.complete(request)
                except RequestError as e:
                    self._answered_with(e, reserved, ticket)
                    raise
                finally:
                    control.in_flight -= 1
            finally:
                self.window.release()
            pacer.settle(reserved, answer_tokens(reply.body)[2])
            self.finder.success(ticket, reply.latency)
            if reply.limits:
                self.finder.headers(reply.limits)
            control.forbidden_streak = 0
            self._charge(reply, request)
            parsed = None
            if self.verdict is not None:
                try:
                    parsed = self.verdict.check(reply.body)
                except InvalidOutput as e:
                    # Paid for, so counted, though no result comes of it.
                    invalid += 1
                    usage.answer(e.code)
                    usage.add_discarded(reply.body, request.model)
                    e.transient = invalid < self.verdict.max_attempts
                    e.body, e.request_id = reply.body, reply.request_id
                    raise
            usage.answer("200")
            return reply, parsed

        try:
            reply, parsed = await self.retry.call(attempt, sleep=seat.backoff if seat else self.control.nap)
        except Abandoned:
            return None
        except RequestError as e:
            if self._stops_run(e):
                return None
            return Failure(
                line=request.line,
                code=e.code,
                message=e.message,
                custom_id=request.custom_id,
                status=e.status,
                body=e.body,
                request_id=e.request_id,
                attempts=attempts,
                metadata=request.metadata,
                model=request.model,
            )
        label = self.verdict.label(parsed) if self.verdict is not None else None
        return Success(request=request, reply=reply, attempts=attempts, parsed=parsed, label=label)

    def _stop_for_budget(self) -> None:
        assert self.budget is not None
        self.control.stop(
            RunStopped(
                f"the budget is reached: {money(self.budget.spent)} spent of the "
                f"{money(self.budget.cap)} cap (every run into this folder counts); run again with "
                "a higher --max-cost to resume",
                code="budget_reached",
            )
        )

    def _charge(self, reply: Reply, request: Request) -> None:
        """Count an answer against the budget; stop if its cost cannot be told."""
        if self.budget is None:
            return
        if self.budget.charge(reply.body, request.model) is None:
            model = reply.body.get("model") or request.model
            self.control.stop(
                RunStopped(
                    f"cannot keep to --max-cost: the server reports no cost for {model} and the job "
                    f'has no price for it; add [prices."{model}"] prompt = ..., completion = ... '
                    "(dollars per million tokens) to the job file, then run again to resume",
                    code="budget_unpriced",
                )
            )

    def _answered_with(self, error: RequestError, reserved: int, ticket: int) -> None:
        self.usage.answer(answer_key(error))
        # A refused request is not counted against the token budget by the server.
        self.pacer.settle(reserved, 0 if isinstance(error, HTTPStatusError) else reserved)
        if error.limits:
            self.finder.headers(error.limits)
        if error.refusal or (error.status == 503 and isinstance(error, HTTPStatusError)):
            self.finder.pushback(ticket, error.retry_after, error.message)
        elif error.transient:
            self.finder.failure(ticket)
        else:
            self.finder.answered(ticket)  # the request's fault, not the endpoint's

    def _stops_run(self, error: RequestError) -> bool:
        """401 and 402 stop the whole run at once (and a 429 that says the account has no
        quota left, as OpenAI's `insufficient_quota`); so does a streak of 403s."""
        status = error.status if isinstance(error, HTTPStatusError) else None
        if error.quota_spent:
            status = 402
        if status == 403 and _refused_content(error.body):
            return False  # a moderation refusal is about this request, not the key
        if status == 403:
            self.control.forbidden_streak += 1
            if self.control.forbidden_streak < FORBIDDEN_STREAK:
                return False
        elif status not in (401, 402):
            return False
        if status == 402:
            message = (
                f"the server says the account is out of credits ({error.message}); "
                "add credits, then run the same command again to resume"
            )
            code = "credits_exhausted"
        else:
            message = (
                f"the server refused the API key ({error.message}); check the key in the "
                "environment variable named by api_key_env, then run the same command again to resume"
            )
            code = "key_rejected"
        self.control.stop(RunStopped(message, code=code))
        return True
