"""A job's prices (`[prices]`, dollars per million tokens, per model): `Price`, the table
`Prices` (the synchronous tier's prices, and what a batch pays: `batch`, the share of every
price, or a model's own `batch_prompt` and `batch_completion`), its checking
(`check_prices`, each mistake one line naming the file and the key), and what Anthropic's
models pay to write to their prompt cache (`anthropic`). `pipeline.jobfile` reads the table
from the job file; `pipeline.account.cost` prices answers with it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple, TypeVar, overload

from pipeline.errors import SettingsError
from pipeline.jobfile import unknown_key

_T = TypeVar("_T")


# NamedTuples: as frozen dataclasses, these two cost every run's start 5 million instructions
# more (callgrind).
class Price(NamedTuple):
    """Dollars per million tokens. A prompt token read from the provider's prompt cache costs
    `cached`, one written to it `cache_write`; None: the prompt price (for `cached`, an upper
    bound: the reports say the saving is not known)."""

    prompt: float
    completion: float
    cached: float | None = None
    cache_write: float | None = None

    def scaled(self, share: float) -> Price:
        """Every price times `share` (what a batch pays of it)."""
        cached, write = self.cached, self.cache_write
        return Price(
            self.prompt * share,
            self.completion * share,
            None if cached is None else cached * share,
            None if write is None else write * share,
        )


# Anthropic's writes to its prompt cache cost 1.25x the prompt price (5 minutes, all its
# models); a model of its that `[prices]` gives no `cache_write` is priced so, never below.
ANTHROPIC_WRITE = 1.25


def anthropic(model: str) -> bool:
    """Whether the model is Anthropic's (by its name, as OpenRouter or Anthropic spell it)."""
    name = model.lower()
    return "claude" in name or name.removeprefix("openrouter/").startswith("anthropic")


class Prices(Mapping[str, Price]):
    """A job's `[prices]`: as a mapping, each model's price now (the synchronous tier's); with
    it, what the batch tier pays, as written (`account.cost.tier_prices` reads the two)."""

    __slots__ = ("_now", "batch", "share")

    def __init__(
        self,
        now: Mapping[str, Price],
        *,
        batch: Mapping[str, Price] | None = None,
        share: float | None = None,
    ) -> None:
        self._now = dict(now)
        self.batch: Mapping[str, Price] = dict(batch or {})  # a model's own batch_prompt/_completion
        self.share = share  # `batch = 0.5`: the share of each model's price a batch pays

    def __getitem__(self, model: str) -> Price:
        return self._now[model]

    # Every answer looks its model up (`price_for`, up to three spellings): at dict speed, not
    # through Mapping's KeyError (0.9 us a miss, measured, where a dict takes 0.24).
    @overload
    def get(self, model: str, /) -> Price | None: ...
    @overload
    def get(self, model: str, /, default: Price | _T) -> Price | _T: ...
    def get(self, model: str, /, default: object = None) -> object:
        return self._now.get(model, default)

    def __contains__(self, model: object) -> bool:
        return model in self._now

    def __iter__(self) -> Iterator[str]:
        return iter(self._now)

    def __len__(self) -> int:
        return len(self._now)

    def __eq__(self, other: object) -> bool:
        # Mapping's own compares the prices now alone: two tables that a batch pays apart
        # would be equal (and so two settings).
        if isinstance(other, Prices):
            return (self._now, self.batch, self.share) == (other._now, other.batch, other.share)
        return super().__eq__(other)

    def __repr__(self) -> str:
        return f"Prices({self._now!r}, batch={self.batch!r}, share={self.share!r})"


_PRICE_KEYS = (
    "prompt", "completion", "cached", "cache_write",
    "batch_prompt", "batch_completion", "batch_cached", "batch_cache_write",
)  # fmt: skip
_BATCH_KEYS = ("batch_prompt", "batch_completion", "batch_cached", "batch_cache_write")
_NOW_KEYS = ("prompt", "completion", "cached", "cache_write")
_A_PRICE = "{ prompt = 0.5, completion = 1.5 } (dollars per million tokens)"


def check_prices(where: str, raw: Mapping[str, Any]) -> Prices:
    """`[prices]`: a table per model, and `batch`, the share of each price a batch pays."""
    now: dict[str, Price] = {}
    batch: dict[str, Price] = {}
    stated: dict[str, dict[str, Any]] = {}  # the tables that state a batch price
    share: float | None = None
    for model, entry in raw.items():
        if model == "batch" and not isinstance(entry, dict):
            share = _batch_share(where, entry)
            continue
        if not isinstance(entry, dict):
            if isinstance(entry, int | float) and _near(model, ("batch",)):
                raise unknown_key(f"{where}: [prices]", model, ("batch",))
            raise SettingsError(
                f"{where}: [prices] '{model}' must be a table like {_A_PRICE}, "
                "or batch = 0.5 (the share of each price a batch pays)"
            )
        table = f'{where}: [prices."{model}"]'
        for key in entry:
            if key not in _PRICE_KEYS:
                raise unknown_key(table, key, _PRICE_KEYS)
        # A table of batch prices alone prices the batch tier only: the synchronous tier has
        # no price for the model (shown as unknown, never as $0).
        if not entry.keys() & {"batch_prompt", "batch_completion"} or entry.keys() & {"prompt", "completion"}:
            now[model] = _price(table, entry, model, _NOW_KEYS)
        if entry.keys() & {"batch_prompt", "batch_completion"}:
            stated[model] = entry
    # A half of a batch price left out is what a batch pays where the table states none: the
    # model's price times the share, else its price (an upper bound); never $0 for it. Once the
    # share is known: `batch = 0.5` may come after a model's table (`m = {...}` inline).
    factor = 1.0 if share is None else share
    for model, entry in stated.items():
        sync = now.get(model, Price(0.0, 0.0))
        implied = dict(zip(_BATCH_KEYS, sync.scaled(factor), strict=True))
        price = _price(
            f'{where}: [prices."{model}"]',
            {k: v for k, v in implied.items() if v is not None} | entry,
            model,
            _BATCH_KEYS,
        )
        batch[model] = _cache_prices_follow(price, sync, entry)
    return Prices(now, batch=batch, share=share)


def _cache_prices_follow(batch: Price, sync: Price, entry: Mapping[str, Any]) -> Price:
    """A batch's cached and write prices left out, as the same share of its prompt price as
    at the synchronous tier (Anthropic's batch reads at a tenth of its batch prompt price and
    writes at 1.25x it, as synchronously): a stated `batch_prompt` of half the prompt price
    with no `batch = 0.5` priced a batch's writes at the full synchronous 1.25x, 2.5 times
    its batch prompt price."""
    if sync.prompt <= 0:
        return batch
    ratio = batch.prompt / sync.prompt
    if "batch_cached" not in entry and sync.cached is not None:
        batch = batch._replace(cached=sync.cached * ratio)
    if "batch_cache_write" not in entry and sync.cache_write is not None:
        batch = batch._replace(cache_write=sync.cache_write * ratio)
    return batch


def _price(table: str, entry: Mapping[str, Any], model: str, keys: tuple[str, ...]) -> Price:
    prompt, completion, cached, write = keys
    try:
        price = Price(
            _dollars(entry.get(prompt, 0.0)),
            _dollars(entry.get(completion, 0.0)),
            _dollars(entry[cached]) if cached in entry else None,
            _dollars(entry[write]) if write in entry else None,
        )
    except (TypeError, ValueError, OverflowError):
        said = f"{prompt} and {completion}"
        if cached in entry or write in entry:
            said = f"{prompt}, {completion}, {cached} and {write}"
        raise SettingsError(f"{table} {said} must be numbers") from None
    if any(value is not None and value < 0 for value in price):
        raise SettingsError(f"{table} prices cannot be negative")
    if price.cache_write is None and anthropic(model):
        price = price._replace(cache_write=price.prompt * ANTHROPIC_WRITE)
    return price


def _dollars(value: Any) -> float:
    """A price: a finite number (a numeric string passes, as it always has). A nan would make
    every cost nan, and a budget never stops on nan (no comparison with it is true); true is
    no price; -0.0 is 0.0, shown so."""
    if isinstance(value, bool):
        raise TypeError(value)
    dollars = float(value)
    if not math.isfinite(dollars):
        raise ValueError(value)
    return dollars + 0.0


def _batch_share(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise SettingsError(
            f"{where}: [prices] batch is the share of each price a batch pays, from 0 to 1 "
            f"(0.5 for half price), not {value!r}"
        )
    return float(value) + 0.0  # (-0.0 would show a batch's cost as $-0.0000)


def _near(key: str, known: tuple[str, ...]) -> bool:
    import difflib  # (only a mistyped key needs it)

    return bool(difflib.get_close_matches(key, known, n=1))
