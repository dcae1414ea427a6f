"""The one retry policy: which failures are tried again, how long to wait, when to give up.

Retried: 408, 409, 425, 429, 500, 502, 503, 504, timeouts, dropped connections, malformed
answers and provider errors that are not a client error. Never retried: any other 4xx.
Backoff is exponential with full jitter (AWS Architecture Blog, "Exponential Backoff and
Jitter", 2015), and never shorter than the server's Retry-After. Attempts and total time are
both bounded; the total counts the coming sleep, so no attempt starts past the deadline.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
)

from pipeline.errors import RequestError

T = TypeVar("T")


def is_transient(error: BaseException) -> bool:
    return isinstance(error, RequestError) and error.transient


def backoff(*, base: float, cap: float) -> Callable[[RetryCallState], float]:
    def wait(state: RetryCallState) -> float:
        error = state.outcome.exception() if state.outcome else None
        jitter = random.uniform(0, min(cap, base * 2 ** (state.attempt_number - 1)))
        server = getattr(error, "retry_after", None) or 0.0
        return max(jitter, server)

    return wait


class RetryPolicy:
    def __init__(self, *, max_attempts: int, max_time: float, base: float, cap: float) -> None:
        self._max_attempts = max_attempts
        self._retrying = AsyncRetrying(
            retry=retry_if_exception(is_transient),
            stop=stop_after_attempt(max_attempts) | stop_before_delay(max_time),
            wait=backoff(base=base, cap=cap),
            sleep=anyio.sleep,
            reraise=True,
        )

    async def call(
        self, fn: Callable[[], Awaitable[T]], *, sleep: Callable[[float], Awaitable[None]] | None = None
    ) -> T:
        """Run `fn` until it succeeds, fails for good, or the attempts or time run out;
        the last error is raised as it is. `sleep` waits between attempts."""
        # Most requests succeed at once: they never meet tenacity, whose bookkeeping costs
        # about 15 µs a call, a tenth of what the HTTP exchange itself costs.
        try:
            return await fn()
        except RequestError as e:
            if not e.transient or self._max_attempts == 1:
                raise
            first: list[RequestError] = [e]

        async def again() -> T:
            # tenacity's first attempt replays the failure already seen, so that attempts,
            # backoff and Retry-After are all counted and waited as if it had made it.
            if first:
                raise first.pop()
            return await fn()

        retrying = self._retrying if sleep is None else self._retrying.copy(sleep=sleep)
        result: Any = await retrying(again)
        return result  # type: ignore[no-any-return]
