"""The one retry policy: which failures are tried again, how long to wait, when to give up.

Retried: 408, 409, 425, 429, 500, 502, 503, 504, timeouts, dropped connections, malformed
answers and provider errors that are not a client error. Never retried: any other 4xx.
Backoff is exponential with full jitter (AWS Architecture Blog, "Exponential Backoff and
Jitter", 2015), and never shorter than the server's Retry-After. Attempts and total time are
both bounded; the total counts the coming sleep, so no attempt starts past the deadline.

A refusal (429) is not an error: it means "later", so it spends neither an attempt nor the
total time. The request waits what the server asks (or backs off when it does not say) and
is sent again; only a server that lets nothing through for long stops the run (the rate
finder's `give_up`), and no request fails because it was asked to wait. Nor does a failure
while the endpoint as a whole is down (`error.outage`, `pipeline.pace.outage`) spend either:
the request goes again at once, and waits at the gate for the endpoint to answer.
"""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable
from functools import cached_property
from typing import TYPE_CHECKING, TypeVar

import anyio

from pipeline.errors import RequestError

if TYPE_CHECKING:
    from tenacity import RetryCallState, Retrying

T = TypeVar("T")


MAX_REFUSAL_WAIT = 120.0  # seconds: a longer wait is the run's to decide (it stops)


def is_transient(error: BaseException) -> bool:
    return isinstance(error, RequestError) and error.transient


def refusal_wait(error: RequestError, refusals: int, *, base: float, cap: float) -> float:
    """How long a refused request waits: what the server asks, else a jittered backoff."""
    if error.retry_after is not None:
        return min(error.retry_after, MAX_REFUSAL_WAIT)
    return random.uniform(0, min(cap, base * 2 ** (refusals - 1)))


def backoff(*, base: float, cap: float) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        jitter = random.uniform(0, min(cap, base * 2 ** (state.attempt_number - 1)))
        server = getattr(error, "retry_after", None) or 0.0
        return max(jitter, server)

    return wait


class RetryPolicy:
    """The policy is tenacity's: its retry, stop and wait strategies, judged on its
    `RetryCallState`. Applying it is a loop of our own rather than `AsyncRetrying`, whose
    machinery (a list of actions rebuilt and inspected every attempt) cost about 100 µs of CPU
    per retried request, measured with py-spy on 50,000 requests under the fault mix: 0.8 s
    of the run's 12 s, on a path that a 429 storm makes the hot one."""

    def __init__(
        self, *, max_attempts: int, max_time: float, base: float, cap: float, max_refused: float = 600.0
    ) -> None:
        self._max_attempts = max_attempts
        self._base, self._cap = base, cap
        self._max_refused = max_refused
        self._max_time = max_time

    @cached_property
    def policy(self) -> Retrying:
        """tenacity's strategies, built at the first failure: a run whose requests all
        succeed never imports tenacity (3 ms of its start)."""
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, stop_before_delay

        return Retrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(self._max_attempts) | stop_before_delay(self._max_time),
            wait=backoff(base=self._base, cap=self._cap),
            reraise=True,
        )

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        failed: RequestError | None = None,
        started: float | None = None,
        spent: int = 0,
    ) -> T:
        """Run `fn` until it succeeds, fails for good, or the attempts or time run out;
        the last error is raised as it is. `sleep` waits between attempts. `failed`: the
        first attempt, made by the caller at `started` (time.monotonic), failed so: most
        requests succeed at once, and their caller pays for no call here. `spent`: attempts
        made before this call's first (in batches, by a line `--then sync` sends now): they
        count against the attempts allowed."""
        started = time.monotonic() if started is None else started
        wait = sleep or anyio.sleep
        refused = [0.0]  # seconds spent waiting on refusals: not time spent failing
        try:
            if failed is None:
                try:
                    return await fn()
                except RequestError as e:
                    failed = e
            try:
                return await self._past_refusals(fn, wait, refused, failed)
            finally:
                del failed  # (a cycle through the traceback, as below)
        except RequestError as e:
            if not e.transient or self._max_attempts <= 1 + spent:
                raise
            error = e
        from tenacity import RetryCallState

        policy = self.policy
        state = RetryCallState(policy, fn=None, args=(), kwargs={})
        state.attempt_number += spent
        try:
            while True:
                # As tenacity's own loop: should this be retried, after how long, or is it over.
                state.start_time = started + refused[0]
                state.set_exception((type(error), error, None))
                if not policy.retry(state):
                    raise error
                state.upcoming_sleep = delay = policy.wait(state)
                if policy.stop(state):
                    raise error
                state.idle_for += delay
                await wait(delay)
                state.prepare_for_next_attempt()
                try:
                    return await self._past_refusals(fn, wait, refused)
                except RequestError as e:
                    error = e
        finally:
            # The error raised holds this frame in its traceback: let go of it here, or the
            # two keep each other (and the answer's body) alive until the cycle collector runs.
            del error, state

    async def _past_refusals(
        self,
        fn: Callable[[], Awaitable[T]],
        wait: Callable[[float], Awaitable[None]],
        refused: list[float],
        failed: RequestError | None = None,
    ) -> T:
        """One attempt, sent again while the server refuses it, waiting what it asks; for
        `max_refused` seconds at most, as one request may be refused while others go (a model
        an aggregator cannot serve for now): then it fails, to be tried by the next run.
        `failed`: how the attempt already made ended, if one was."""
        refusals = 0
        first = 0.0
        down = 0.0  # when the last attempt failed in an outage: the time since is the outage's
        while True:
            try:
                if failed is not None:
                    raise failed
                return await fn()
            except RequestError as e:
                failed = None  # handled here as an error of fn() is (and no cycle kept)
                if down:
                    refused[0] += time.monotonic() - down
                    down = 0.0
                if e.outage:
                    # The endpoint is down (`pipeline.pace.outage`): the request goes again at
                    # once, and the gate holds it until a probe gets through; only the run gives
                    # up on an outage.
                    down = time.monotonic()
                    continue
                if not e.refusal:
                    raise
                refusals += 1
                now = time.monotonic()
                first = first or now
                delay = refusal_wait(e, refusals, base=self._base, cap=self._cap)
                if now + delay - first > self._max_refused:
                    e.transient = False
                    e.message = f"{e.message} (refused for {now - first:.0f}s; the next run tries it again)"
                    raise
            await wait(delay)
            refused[0] += delay
