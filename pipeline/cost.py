"""What an answer cost, and a budget that stops the run before it costs too much.

A cost comes from the server (`usage.cost`, as OpenRouter reports it) where it says; else
from the job's `[prices]` table (dollars per million prompt and completion tokens); else it
is not known, and said to be so.

The budget (`--max-cost`) covers everything spent into the output folder, every run. Before
a request is sent it reserves the request's worst case: its estimated prompt plus every
token its `max_tokens` allows, at the model's price, or at the average cost per token seen so
far where no price is known. A request whose reservation would take spent plus reserved past
the cap is not sent, and the run stops (exit 3) with what it spent.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from pipeline.job import Request
from pipeline.settings import Price
from pipeline.usage import Usage


def money(value: float | None, *, unknown: str = "not reported") -> str:
    """Dollars, with the decimals that say something at that size; never a silent $0."""
    if value is None:
        return unknown
    if value >= 100:
        return f"${value:,.2f}"
    if 0 < value < 0.0001:
        return f"${value:.6f}"
    return f"${value:,.4f}"


def price_for(prices: Mapping[str, Price], model: str | None) -> Price | None:
    """The price of `model`, also found under its OpenRouter spelling (`openrouter/...`)."""
    if not model or not prices:
        return None
    price = prices.get(model)
    if price is None and model.startswith("openrouter/"):
        price = prices.get(model.removeprefix("openrouter/"))
    if price is None:
        price = prices.get(f"openrouter/{model}")
    return price


def priced(price: Price, prompt_tokens: int, completion_tokens: int) -> float:
    return (prompt_tokens * price.prompt + completion_tokens * price.completion) / 1e6


def reported_cost(body: Mapping[str, Any]) -> float | None:
    usage = body.get("usage")
    cost = usage.get("cost") if isinstance(usage, dict) else None
    return float(cost) if isinstance(cost, int | float) and not isinstance(cost, bool) else None


def _tokens(body: Mapping[str, Any]) -> tuple[int, int]:
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return 0, 0
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    return (prompt if isinstance(prompt, int) else 0, completion if isinstance(completion, int) else 0)


@dataclass(slots=True)
class Reservation:
    amount: float
    blind: bool  # nothing told what it could cost: sent alone, to learn


class Budget:
    def __init__(self, cap: float, usage: Usage, prices: Mapping[str, Price]) -> None:
        self.cap = cap
        self.prices = prices
        totals = usage.totals()
        costed = totals.with_cost + totals.priced
        share = costed / totals.requests if totals.requests else 0.0
        # Cost and tokens of the answers whose cost is known: the average cost per token,
        # where a model has no price. Earlier runs' results count too.
        self._known_cost = totals.cost
        self._known_tokens = totals.total_tokens * share
        rate = self.per_token
        unknown = totals.total_tokens - self._known_tokens
        self.spent = totals.cost + (unknown * rate if rate is not None else 0.0)
        self.reserved = 0.0
        self._blind = False
        self._learned: anyio.Event | None = None

    @property
    def per_token(self) -> float | None:
        return self._known_cost / self._known_tokens if self._known_tokens else None

    def worst_case(self, request: Request) -> float | None:
        price = price_for(self.prices, request.model)
        if price is not None:
            return priced(price, request.prompt_tokens, request.max_completion_tokens)
        rate = self.per_token
        return None if rate is None else rate * request.token_estimate

    async def reserve(self, request: Request) -> Reservation | None:
        """Hold back the request's worst case; None when that would pass the cap."""
        while (worst := self.worst_case(request)) is None:
            if not self._blind:
                # Nothing tells what this model costs yet: send one such request alone,
                # and let its answer tell.
                self._blind = True
                self._learned = anyio.Event()
                return Reservation(0.0, blind=True)
            assert self._learned is not None
            await self._learned.wait()
        if self.spent + self.reserved + worst > self.cap:
            return None
        self.reserved += worst
        return Reservation(worst, blind=False)

    def release(self, reservation: Reservation) -> None:
        self.reserved = max(self.reserved - reservation.amount, 0.0)
        if reservation.blind:
            self._blind = False
            if self._learned is not None:
                self._learned.set()

    def charge(self, body: Mapping[str, Any], model: str | None) -> float | None:
        """Count an answer the server will bill; returns its cost where it can be told."""
        prompt, completion = _tokens(body)
        cost = reported_cost(body)
        if cost is None:
            answered = body.get("model")
            price = price_for(self.prices, answered if isinstance(answered, str) else model)
            if price is not None:
                cost = priced(price, prompt, completion)
        if cost is not None:
            self._known_cost += cost
            self._known_tokens += prompt + completion
        else:
            rate = self.per_token
            cost = None if rate is None else rate * (prompt + completion)
        if cost is not None:
            self.spent += cost
        return cost
