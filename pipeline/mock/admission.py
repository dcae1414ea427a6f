"""Which requests the mock lets through, and how it says when to come back.

A request meets the account's limits (`--rpm`, `--tpm`, `--quota`: every request counts) and
its model's (`--model-rpm`, `--model-tpm`: only the requests naming that model count), each
counted the same way (`pipeline.mock.limits`); it is refused by the first that is full, and
counts against none then. A model's refusal names the model, as OpenRouter's do.

Limits move (`--limit-changes`): a request rate set anew for the account or a model so many
seconds after the first request the mock gets (not after it started, so a bench's schedule
does not depend on how long its client took to start).

A refusal says its wait in one of `names.WAYS`:
- `exact`: `Retry-After` in seconds with milliseconds ("0.071"); a window's way by default;
- `seconds`: `Retry-After` rounded up to whole seconds ("1"), as most servers send it;
- `ms`: `retry-after-ms` ("71"), and `Retry-After` rounded up beside it, as OpenAI sends them;
- `message`: in the message only ("Please try again in 71ms.", "in 1.2s."), as OpenAI's
  message says it; a bucket's way by default;
- `none`: not at all.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from typing import Any

from pipeline.mock.limits import Bucket, Counted, Quota, Refusal, Window, charged_tokens, make_limits
from pipeline.mock.names import Change


def _ms(wait: float) -> int:
    """A wait in whole milliseconds, rounded up (past float noise: 1.2000000000000002 s is 1200)."""
    return max(math.ceil(round(wait * 1000, 6)), 1)


def _seconds(wait: float) -> int:
    return math.ceil(_ms(wait) / 1000)


def in_words(wait: float) -> str:
    """A wait as OpenAI's messages say it: "71ms" under a second, else "1.2s" (rounded up)."""
    ms = _ms(wait)
    return f"{ms}ms" if ms < 1000 else f"{ms / 1000:g}s"


def said(refusal: Refusal, way: str) -> tuple[str, dict[str, str]]:
    """A refusal's message and headers, its wait said the `way` way."""
    wait = refusal.wait
    if way == "exact":
        return refusal.message, {"Retry-After": f"{wait:.3f}"}
    if way == "seconds":
        return refusal.message, {"Retry-After": str(_seconds(wait))}
    if way == "ms":
        return refusal.message, {"retry-after-ms": str(_ms(wait)), "Retry-After": str(_seconds(wait))}
    if way == "message":
        return f"{refusal.message}. Please try again in {in_words(wait)}.", {}
    return refusal.message, {}


class Admission:
    """The account's limits and each model's; what each let through and refused, by second."""

    def __init__(
        self,
        *,
        style: str,
        rpm: float | None = None,
        tpm: float | None = None,
        count: str = "usage",
        capacity: float = 60.0,
        quota: int | None = None,
        model_rpm: dict[str, float] | None = None,
        model_tpm: dict[str, float] | None = None,
        changes: tuple[Change, ...] = (),
        way: str | None = None,
        clock: Callable[[], float],
    ) -> None:
        model_rpm, model_tpm = model_rpm or {}, model_tpm or {}
        self.account: list[Counted] = [*make_limits(style=style, rpm=rpm, tpm=tpm, capacity=capacity)]
        if quota is not None:
            self.account.append(Quota(quota))
        self.models: dict[str, list[Counted]] = {
            model: [
                *make_limits(
                    style=style,
                    rpm=model_rpm.get(model),
                    tpm=model_tpm.get(model),
                    capacity=capacity,
                    scope=f"model {model} on ",
                )
            ]
            for model in {*model_rpm, *model_tpm}
        }
        self.tokens_of = set(model_tpm) | ({""} if tpm else set())  # "": every request
        self.count = count
        self.changes = sorted(changes, key=lambda change: change[1])
        self.way = way or ("message" if style == "bucket" else "exact")
        self.clock = clock
        self.first: float | None = None
        self.accepted_per_second: Counter[int] = Counter()
        self.refused_per_second: Counter[int] = Counter()
        self.accepted: dict[str, Counter[int]] = {}  # by model, by second
        self.refused: Counter[str] = Counter()  # by model
        self.span: dict[str, tuple[float, float]] = {}  # by model: its first and last accepted

    @property
    def window(self) -> Window | None:
        """The account's window, whose counts `x-ratelimit-*` headers state."""
        return next((limit for limit in self.account if isinstance(limit, Window)), None)

    def _move(self, now: float) -> None:
        if self.first is None:
            self.first = now
        while self.changes and self.changes[0][1] <= now - self.first:
            model, _, rpm = self.changes.pop(0)
            limits = self.models.get(model, []) if model else self.account
            first = limits[0] if limits else None  # make_limits puts the one counting requests first
            if isinstance(first, Window) or (isinstance(first, Bucket) and first.kind == "requests"):
                first.set_rpm(rpm)

    def admit(self, body: dict[str, Any]) -> tuple[str, dict[str, str]] | None:
        """None when the request may go; else the 429's message and headers."""
        now = self.clock()
        if self.changes or self.first is None:
            self._move(now)
        model = body.get("model")
        model = model if isinstance(model, str) else ""
        charged = "" in self.tokens_of or model in self.tokens_of
        tokens = charged_tokens(body, count=self.count) if charged else 0.0
        admitted: list[Counted] = []
        # The model's first: a request its model refuses never reaches the account's count.
        for limit in (*self.models.get(model, ()), *self.account):
            refusal = limit.admit(now, tokens)
            if refusal is not None:
                for earlier in admitted:
                    earlier.undo(tokens)
                self.refused_per_second[int(now)] += 1
                self.refused[model] += 1
                return said(refusal, self.way)
            admitted.append(limit)
        self.accepted_per_second[int(now)] += 1
        self.accepted.setdefault(model, Counter())[int(now)] += 1
        self.span[model] = (self.span.get(model, (now, now))[0], now)
        return None

    def stats(self) -> dict[str, Any]:
        models = {
            model: {
                "accepted": sum(seconds.values()),
                "refused": self.refused[model],
                "accepted_per_second": {str(k): v for k, v in sorted(seconds.items())},
                "first_accepted": self.span[model][0],
                "last_accepted": self.span[model][1],
            }
            for model, seconds in self.accepted.items()
            if model
        }
        for model, refused in self.refused.items():
            if model and model not in models:
                models[model] = {"accepted": 0, "refused": refused, "accepted_per_second": {}}
                models[model] |= {"first_accepted": None, "last_accepted": None}
        return {
            "first_request": self.first,
            "accepted_per_second": {str(k): v for k, v in sorted(self.accepted_per_second.items())},
            "refused_per_second": {str(k): v for k, v in sorted(self.refused_per_second.items())},
            "models": models,
        }
