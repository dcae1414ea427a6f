"""The mock's rate limits, counted the ways real servers count them.

- `window`: so many requests (and tokens) per fixed window of wall-clock time: one second
  (rpm/60 a second, as many servers count), or one minute (the whole minute's quota may go
  at once, then nothing until the next minute). A refusal says when the next window opens.
- `bucket`: a bucket that holds a minute's quota and refills continuously (a whole minute's
  requests may go at once, then one every 60/rpm seconds). A refusal says, in its message
  only, as OpenAI's do, when the next request would fit ("Please try again in 71ms").
- `quota`: so many requests, then nothing until midnight UTC (a daily quota spent).

A token limit counts either what the answer uses (`usage`: prompt + completion, as a server
that settles its count when the answer is made), or, as OpenAI documents its own (`arrival`),
the prompt and all the request may use (`max_tokens` times `n`), charged when it arrives
whatever the answer then uses (`charged_tokens`).

Every limit is checked on arrival, before the answer is made: a refusal comes back at once,
while an answer takes as long as the model does.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from typing import Any, Protocol

from pipeline.mock.answers import ANSWER_MAX, answer_limit, completion, estimate_tokens


@dataclass(frozen=True, slots=True)
class Refusal:
    wait: float  # seconds until the server would let a request through
    message: str
    header: bool = True  # says it in a Retry-After header too, not only in the message


class Limit(Protocol):
    def admit(self, now: float, tokens: float) -> Refusal | None:
        """Count a request arriving at `now` (wall-clock seconds), or refuse it."""


class Window:
    """`requests` and `tokens` per fixed window of `length` seconds (either may be None)."""

    def __init__(self, *, length: float, requests: float | None, tokens: float | None) -> None:
        self.length = length
        self.requests = requests
        self.tokens = tokens
        self.index = -1
        self.used_requests = 0
        self.used_tokens = 0.0

    def _roll(self, now: float) -> None:
        index = int(now // self.length)
        if index != self.index:
            self.index, self.used_requests, self.used_tokens = index, 0, 0.0

    def admit(self, now: float, tokens: float) -> Refusal | None:
        self._roll(now)
        wait = max((self.index + 1) * self.length - now, 0.001)
        if self.requests is not None and self.used_requests + 1 > self.requests:
            return Refusal(wait, "Rate limit reached for requests")
        # Tokens as `charged_tokens` counts them. A lone request bigger than a window still goes.
        if self.tokens is not None and self.used_tokens + tokens > self.tokens and self.used_tokens > 0:
            return Refusal(wait, "Rate limit reached for tokens")
        self.used_requests += 1
        self.used_tokens += tokens
        return None

    def headers(self, now: float) -> dict[str, str]:
        """What is left in the current window, as OpenAI states it (x-ratelimit-*, per minute)."""
        self._roll(now)
        reset = f"{max((self.index + 1) * self.length - now, 0.0):.3f}s"
        per_minute = 60 / self.length
        headers: dict[str, str] = {}
        for kind, limit, used in (
            ("requests", self.requests, float(self.used_requests)),
            ("tokens", self.tokens, self.used_tokens),
        ):
            if limit is not None:
                headers[f"x-ratelimit-limit-{kind}"] = str(int(limit * per_minute))
                headers[f"x-ratelimit-remaining-{kind}"] = str(int(max(limit - used, 0)))
                headers[f"x-ratelimit-reset-{kind}"] = reset
        return headers


class Bucket:
    """Holds `capacity` requests, refilled at `rate` a second."""

    def __init__(self, *, capacity: float, rate: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.level = capacity
        self.at: float | None = None

    def admit(self, now: float, tokens: float) -> Refusal | None:
        if self.at is not None:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now
        if self.level >= 1:
            self.level -= 1
            return None
        wait = (1 - self.level) / self.rate
        ms = max(math.ceil(wait * 1000), 1)
        return Refusal(wait, f"Rate limit reached for requests. Please try again in {ms}ms.", header=False)


class Quota:
    """`total` requests, then every request refused until midnight UTC."""

    def __init__(self, total: int) -> None:
        self.left = total

    def admit(self, now: float, tokens: float) -> Refusal | None:
        if self.left > 0:
            self.left -= 1
            return None
        moment = dt.datetime.fromtimestamp(now, dt.UTC)
        midnight = dt.datetime.combine(moment.date() + dt.timedelta(days=1), dt.time(), dt.UTC)
        return Refusal((midnight - moment).total_seconds(), "You exceeded your daily quota")


STYLES = ("second", "minute", "bucket")
COUNTS = ("usage", "arrival")  # how a token limit counts a request (see the module's text)


def charged_tokens(body: dict[str, Any], *, count: str) -> float:
    """What a request counts against a token limit, counted the `count` way."""
    if count == "usage":
        return float(completion(body, cost=False)["usage"]["total_tokens"])
    n = body.get("n") or 1
    try:
        return float(estimate_tokens(body) + int(answer_limit(body)) * max(int(n), 1))
    except (TypeError, ValueError):
        return float(estimate_tokens(body) + ANSWER_MAX)


def make_limits(*, style: str, rpm: float | None, tpm: float | None, quota: int | None) -> list[Limit]:
    limits: list[Limit] = []
    if style == "bucket" and rpm:
        limits.append(Bucket(capacity=rpm, rate=rpm / 60))
        rpm = None  # counted by the bucket; tokens, if limited, still per second
    if rpm or tpm:
        length = 60.0 if style == "minute" else 1.0
        share = length / 60
        limits.append(
            Window(
                length=length,
                requests=rpm * share if rpm else None,
                tokens=tpm * share if tpm else None,
            )
        )
    if quota is not None:
        limits.append(Quota(quota))
    return limits
