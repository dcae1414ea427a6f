"""The mock's rate limits, counted the ways real servers count them.

- `window`: so many requests (and tokens) per fixed window of wall-clock time: one second
  (rpm/60 a second, as many servers count), or one minute (the whole minute's quota may go
  at once, then nothing until the next minute). A refusal says when the next window opens.
- `bucket`: a bucket refilled continuously, holding a minute's quota (a whole minute's requests
  may go at once, then one every 60/rpm seconds) or the `capacity` seconds of it one chooses
  (one second: how Anthropic documents its limits). Tokens, when limited, fill a bucket too.
- `quota`: so many requests, then nothing until midnight UTC (a daily quota spent).

A token limit counts either what the answer uses (`usage`: prompt + completion, as a server
that settles its count when the answer is made), or, as OpenAI documents its own (`arrival`),
the prompt and all the request may use (`max_tokens` times `n`), charged when it arrives
whatever the answer then uses (`charged_tokens`).

A refusal says what was full and how long until a request would fit; how a server says that
wait (a header, the message, not at all) is `pipeline.mock.admission`'s, as is which limits a
request meets (the account's, its model's). Every limit is checked on arrival, before the
answer is made: a refusal comes back at once, while an answer takes as long as the model does.
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
    message: str  # what was full, without the wait (`pipeline.mock.admission.said` adds it)


class Limit(Protocol):
    def admit(self, now: float, tokens: float) -> Refusal | None:
        """Count a request arriving at `now` (wall-clock seconds), or refuse it."""


class Counted(Limit, Protocol):
    def undo(self, tokens: float) -> None:
        """Forget a request this admitted and another limit then refused."""


class Window:
    """`requests` and `tokens` per fixed window of `length` seconds (either may be None).
    `scope` names what is limited in a refusal's message ("" for the account)."""

    def __init__(
        self, *, length: float, requests: float | None, tokens: float | None, scope: str = ""
    ) -> None:
        self.length = length
        self.requests = requests
        self.tokens = tokens
        self.scope = scope
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
        if self.requests is not None and self.used_requests + 1 > self._allowed():
            return Refusal(wait, f"Rate limit reached for {self.scope}requests")
        # Tokens as `charged_tokens` counts them. A lone request bigger than a window still goes.
        if self.tokens is not None and self.used_tokens + tokens > self.tokens and self.used_tokens > 0:
            return Refusal(wait, f"Rate limit reached for {self.scope}tokens")
        self.used_requests += 1
        self.used_tokens += tokens
        return None

    def _allowed(self) -> float:
        """Requests this window lets through: a fraction a window (20 a minute counted per
        second) is spread over the windows, one every third second, rather than none at all."""
        r = self.requests or 0.0
        if r == int(r):
            return r
        return math.floor((self.index + 1) * r) - math.floor(self.index * r)

    def undo(self, tokens: float) -> None:
        self.used_requests -= 1
        self.used_tokens -= tokens

    def set_rpm(self, rpm: float) -> None:
        self.requests = rpm * self.length / 60

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
    """Holds `capacity` requests (or tokens, with `kind="tokens"`), refilled continuously at
    `rate` a second. A lone request of more tokens than the bucket holds goes when it is full."""

    def __init__(self, *, capacity: float, rate: float, kind: str = "requests", scope: str = "") -> None:
        self.capacity = capacity
        self.rate = rate
        self.kind = kind
        self.scope = scope
        self.level = capacity
        self.at: float | None = None

    def _fill(self, now: float) -> None:
        if self.at is not None:
            self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def admit(self, now: float, tokens: float) -> Refusal | None:
        self._fill(now)
        cost = tokens if self.kind == "tokens" else 1.0
        need = min(cost, self.capacity) - 1e-9  # a bucket of 0.9999999999999999 holds one
        if self.level >= need:
            self.level -= cost
            return None
        wait = (need - self.level) / self.rate
        return Refusal(wait, f"Rate limit reached for {self.scope}{self.kind}")

    def undo(self, tokens: float) -> None:
        self.level += tokens if self.kind == "tokens" else 1.0

    def set_rpm(self, rpm: float) -> None:
        """A new rate, the bucket holding the same seconds of it (what it holds kept, up to that)."""
        seconds = self.capacity / self.rate
        self.rate = rpm / 60
        self.capacity = self.rate * seconds
        self.level = min(self.level, self.capacity)


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

    def undo(self, tokens: float) -> None:
        self.left += 1


def charged_tokens(body: dict[str, Any], *, count: str) -> float:
    """What a request counts against a token limit, counted the `count` way."""
    if count == "usage":
        return float(completion(body, cost=False)["usage"]["total_tokens"])
    n = body.get("n") or 1
    try:
        return float(estimate_tokens(body) + int(answer_limit(body)) * max(int(n), 1))
    except (TypeError, ValueError):
        return float(estimate_tokens(body) + ANSWER_MAX)


def make_limits(
    *, style: str, rpm: float | None, tpm: float | None, capacity: float = 60.0, scope: str = ""
) -> list[Window | Bucket]:
    """One scope's limits counted the `style` way; when `rpm` is set, the first counts requests.
    A bucket holds `capacity` seconds of its rate."""
    if style == "bucket":
        buckets: list[Window | Bucket] = []
        if rpm:
            buckets.append(Bucket(capacity=rpm / 60 * capacity, rate=rpm / 60, scope=scope))
        if tpm:
            buckets.append(Bucket(capacity=tpm / 60 * capacity, rate=tpm / 60, kind="tokens", scope=scope))
        return buckets
    if not (rpm or tpm):
        return []
    length = 60.0 if style == "minute" else 1.0
    share = length / 60
    requests, tokens = (rpm * share if rpm else None), (tpm * share if tpm else None)
    return [Window(length=length, requests=requests, tokens=tokens, scope=scope)]
