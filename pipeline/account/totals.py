"""One model's totals in the usage: requests, tokens by kind, choices, and cost by where it
came from (`pipeline.account.usage` counts into them)."""

from __future__ import annotations

from typing import Any

_FIELDS = (  # (in the order usage.json keeps them)
    "requests", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens",
    "reasoning_tokens", "choices", "cost_reported", "with_cost", "cost_priced", "priced",
    "cache_write_tokens", "cache_saved", "cache_write_extra", "cache_unpriced", "cache_write_unpriced",
)  # fmt: skip


class ModelUsage:
    """One model's totals. (A plain class with __slots__: every answer kept adds to one, a
    slot is quicker to add to than a dataclass's field, and a dataclass cost its build at
    every run's start.)"""

    __slots__ = _FIELDS

    def __init__(
        self,
        requests: int = 0,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        total_tokens: int = 0,
        cached_tokens: int = 0,
        reasoning_tokens: int = 0,
        choices: int = 0,
        cost_reported: float = 0.0,  # sum of usage.cost where the server reported one
        with_cost: int = 0,  # results whose cost the server reported
        cost_priced: float = 0.0,  # from the job's price table, for results the server did not cost
        priced: int = 0,  # results costed from the price table
        # The provider's prompt cache: prompt tokens written to it (those read are cached_tokens);
        # the dollars it saved (the cached tokens at the prompt price, less at the cached price)
        # and its writes' cost above the prompt price, by the job's prices; and the answers that
        # read whose saving those cannot tell (no price, or no cached price), and that wrote
        # whose writes' extra they cannot (no price).
        cache_write_tokens: int = 0,
        cache_saved: float = 0.0,
        cache_write_extra: float = 0.0,
        cache_unpriced: int = 0,
        cache_write_unpriced: int = 0,
    ) -> None:
        self.requests, self.prompt_tokens, self.completion_tokens = requests, prompt_tokens, completion_tokens
        self.total_tokens, self.cached_tokens, self.reasoning_tokens = (
            total_tokens,
            cached_tokens,
            reasoning_tokens,
        )
        self.choices, self.cost_reported, self.with_cost = choices, cost_reported, with_cost
        self.cost_priced, self.priced = cost_priced, priced
        self.cache_write_tokens, self.cache_saved = cache_write_tokens, cache_saved
        self.cache_write_extra, self.cache_unpriced = cache_write_extra, cache_unpriced
        self.cache_write_unpriced = cache_write_unpriced

    def as_dict(self) -> dict[str, Any]:
        """Its fields by name, in order (as usage.json keeps them)."""
        return {name: getattr(self, name) for name in _FIELDS}

    @property
    def without_cost(self) -> int:
        return self.requests - self.with_cost - self.priced

    @property
    def cost(self) -> float:
        return self.cost_reported + self.cost_priced
