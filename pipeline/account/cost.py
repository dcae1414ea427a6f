"""What an answer cost, and a budget that stops the run before it costs too much.

A cost comes from the server (`usage.cost`, as OpenRouter reports it) where it says; else
from the job's `[prices]` table (dollars per million prompt and completion tokens, and prompt
tokens read from or written to the provider's prompt cache at their own `cached` and
`cache_write` prices) at the run's tier (`tier_prices`: a batch pays its own price); else it
is not known, and said to be so.

The budget (`--max-cost`) covers everything spent into the output folder, every run. Before
a request is sent it reserves the request's worst case: its estimated prompt plus every
token its `max_tokens` allows (twice the longest answer seen, where it sets none), at the
model's price, or at the model's own average cost per token so far where it has no price.
A request whose reservation would take spent plus reserved past the cap is not sent, and
the run stops (exit 3) with what it spent. Of a model nothing can price yet, one request at
a time is sent until an answer tells what it costs.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, NamedTuple

import anyio

from pipeline.account.usage import Usage, answer_tokens, cache_tokens
from pipeline.job import Request
from pipeline.prices import Price, Prices


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


def tier_prices(prices: Mapping[str, Price], tier: str) -> Mapping[str, Price]:
    """The price table a tier pays. At `sync`, `[prices]` as written. At `batch`, each model's
    batch price where the table states one (`batch_prompt`, `batch_completion`), else its
    price times the table's `batch` share, else its price: an upper bound, which the settings
    warn of before such a run (`unpriced_batches`)."""
    if tier != "batch" or not isinstance(prices, Prices):
        return prices
    share = prices.share
    table = {model: price if share is None else price.scaled(share) for model, price in prices.items()}
    table.update(prices.batch)
    return MappingProxyType(table)


def tier_price(prices: Mapping[str, Price], model: str | None, tier: str) -> Price | None:
    """The price of `model` at `tier` (for many models, build the table once: `tier_prices`)."""
    return price_for(tier_prices(prices, tier), model)


def unpriced_batches(prices: Mapping[str, Price]) -> list[str]:
    """The models `[prices]` prices now but says nothing of for a batch: a batch tier run
    shows their cost at the synchronous price."""
    if isinstance(prices, Prices) and prices.share is not None:
        return []
    stated = prices.batch if isinstance(prices, Prices) else {}
    return [model for model in prices if model not in stated]


def priced(
    price: Price, prompt_tokens: int, completion_tokens: int, cached: int = 0, written: int = 0
) -> float:
    """What `price` makes of an answer's tokens: of its prompt, `cached` read from the
    provider's prompt cache and `written` to it (each in the prompt's count, as
    `usage.prompt_tokens_details` has them) at their own prices."""
    if not (cached or written):
        return (prompt_tokens * price.prompt + completion_tokens * price.completion) / 1e6
    cached = min(cached, prompt_tokens)
    written = min(written, prompt_tokens - cached)
    read_price = price.prompt if price.cached is None else price.cached
    write_price = price.prompt if price.cache_write is None else price.cache_write
    prompt = (prompt_tokens - cached - written) * price.prompt + cached * read_price + written * write_price
    return (prompt + completion_tokens * price.completion) / 1e6


def cache_figures(price: Price, cached: int, written: int) -> tuple[float | None, float]:
    """What the prompt cache saved on an answer (its cached tokens at the prompt price, less at
    the cached price; None: `price` states no cached price, so it cannot tell), and what its
    written tokens cost above the prompt price."""
    saved = None if price.cached is None else cached * (price.prompt - price.cached) / 1e6
    write_price = price.prompt if price.cache_write is None else price.cache_write
    return saved, written * (write_price - price.prompt) / 1e6


def answering_model(body: Mapping[str, Any], requested: str | None) -> str | None:
    model = body.get("model")
    return model if isinstance(model, str) and model else requested


def answer_cost(
    body: Mapping[str, Any], prices: Mapping[str, Price], requested: str | None
) -> tuple[float | None, str | None]:
    """What an answer cost and where the figure comes from: the server's `usage.cost`, else
    the price of the model that answered (or, failing that, of the one asked for, since a
    server may answer with a dated name such as gpt-4o-mini-2024-07-18)."""
    usage = body.get("usage")
    cost = usage.get("cost") if isinstance(usage, dict) else None
    if isinstance(cost, int | float) and not isinstance(cost, bool):
        return float(cost), "server"
    price = price_for(prices, answering_model(body, requested)) or price_for(prices, requested)
    if price is None:
        return None, None
    prompt, completion, _ = answer_tokens(body)
    cached, written = cache_tokens(usage) if isinstance(usage, dict) else (0, 0)
    return priced(price, prompt, completion, cached, written), "price table"


# A NamedTuple and a plain class: as dataclasses, these two cost every run's start 2.4
# million instructions more (callgrind); neither is compared, nor shown.
class Reservation(NamedTuple):
    amount: float
    model: str | None  # set when nothing told what the model costs: sent alone, to learn


class _Rate:
    """What one model's answers cost so far, for a cost per token where it has no price."""

    __slots__ = ("cost", "longest", "tokens")

    def __init__(self) -> None:
        self.cost = 0.0
        self.tokens = 0.0
        self.longest = 0  # the most completion tokens one answer used

    @property
    def per_token(self) -> float | None:
        return self.cost / self.tokens if self.tokens else None


class Budget:
    def __init__(self, cap: float, usage: Usage, prices: Mapping[str, Price]) -> None:
        self.cap = cap
        self.prices = prices
        self.spent = 0.0
        self.reserved = 0.0
        self._rates: dict[str, _Rate] = {}
        self._blind: dict[str, anyio.Event] = {}  # models with a request out to learn their cost
        # Earlier runs into the folder count against the cap, and tell what models cost.
        for model, m in usage.models.items():
            costed = m.with_cost + m.priced
            rate = self._rates[model] = _Rate()
            if costed:
                rate.cost = m.cost
                rate.tokens = m.total_tokens * costed / m.requests
            unknown_tokens = m.total_tokens - rate.tokens
            per_token = rate.per_token
            self.spent += m.cost + (unknown_tokens * per_token if per_token is not None else 0.0)
        for mapping in usage.requested_models:
            asked, _, answered = mapping.partition(" -> ")
            if answered in self._rates and asked not in self._rates:
                self._rates[asked] = self._rates[answered]

    def worst_case(self, request: Request, prices: Mapping[str, Price] | None = None) -> float | None:
        """The most `request` can cost (at `prices`, else the budget's), or None when nothing
        tells yet."""
        completion = request.max_completion_tokens
        rate = self._rates.get(request.model)
        if not request.bounded and rate is not None:
            # No max_tokens: allow twice the longest answer this model gave so far.
            completion = max(completion, 2 * rate.longest)
        price = price_for(self.prices if prices is None else prices, request.model)
        if price is not None:
            # (its whole prompt may be written to the provider's prompt cache, at Anthropic
            # above the prompt price: the worst case)
            write = price.cache_write
            written = request.prompt_tokens if write is not None and write > price.prompt else 0
            return priced(price, request.prompt_tokens, completion, 0, written)
        per_token = rate.per_token if rate is not None else None
        return None if per_token is None else per_token * (request.prompt_tokens + completion)

    async def reserve(
        self, request: Request, prices: Mapping[str, Price] | None = None
    ) -> Reservation | None:
        """Hold back the request's worst case; None when that would pass the cap."""
        while (worst := self.worst_case(request, prices)) is None:
            learning = self._blind.get(request.model)
            if learning is None:
                # Nothing tells what this model costs yet: send one of its requests alone,
                # and let the answer tell.
                self._blind[request.model] = anyio.Event()
                return Reservation(0.0, request.model)
            await learning.wait()
        if self.spent + self.reserved + worst > self.cap:
            return None
        self.reserved += worst
        return Reservation(worst, None)

    def covers_another_answer(self) -> bool:
        """Whether the cap still holds if the request in hand is paid for once more (a
        verdict retried after an invalid answer that was billed)."""
        return self.spent + self.reserved <= self.cap

    def release(self, reservation: Reservation) -> None:
        self.reserved = max(self.reserved - reservation.amount, 0.0)
        if reservation.model is not None:
            learning = self._blind.pop(reservation.model, None)
            if learning is not None:
                learning.set()

    def charge(
        self, body: Mapping[str, Any], requested: str | None, prices: Mapping[str, Price] | None = None
    ) -> float | None:
        """Count an answer the server will bill; returns its cost where it can be told."""
        cost, _ = answer_cost(body, self.prices if prices is None else prices, requested)
        prompt, completion, _ = answer_tokens(body)
        names = {requested, answering_model(body, requested)} - {None}
        rates = [self._rates.setdefault(name, _Rate()) for name in names if name]
        for rate in {id(r): r for r in rates}.values():
            rate.longest = max(rate.longest, completion)
            if cost is not None:
                rate.cost += cost
                rate.tokens += prompt + completion
        if cost is None:
            known = next((r.per_token for r in rates if r.per_token is not None), None)
            cost = None if known is None else known * (prompt + completion)
        if cost is not None:
            self.spent += cost
        return cost
