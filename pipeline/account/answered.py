"""What an answer's `usage` says it used: prompt, completion and total tokens, and of the
prompt those read from the provider's prompt cache and written to it. (Read where each answer
is counted, costed or kept: `account.usage`, `account.cost`, `batch.tally`.)"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def _whole(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0


def cache_tokens(usage: Mapping[str, Any]) -> tuple[int, int]:
    """Of a `usage`'s prompt tokens, those read from the provider's prompt cache and those
    written to it: `prompt_tokens_details.cached_tokens` and `.cache_write_tokens` (OpenAI,
    OpenRouter), else Anthropic's own `cache_read_input_tokens` and
    `cache_creation_input_tokens`, as a compatible endpoint may pass them on."""
    details = usage.get("prompt_tokens_details")
    cached = written = 0
    if isinstance(details, dict):
        cached = _whole(details.get("cached_tokens"))
        written = _whole(details.get("cache_write_tokens"))
    if not cached and "cache_read_input_tokens" in usage:
        cached = _whole(usage["cache_read_input_tokens"])
    if not written and "cache_creation_input_tokens" in usage:
        written = _whole(usage["cache_creation_input_tokens"])
    return cached, written


def answer_tokens(body: Mapping[str, Any]) -> tuple[int, int, int]:
    """Prompt, completion and total tokens of an answer, as its `usage` says (0 where it
    says nothing; the total is the sum when it gives none)."""
    usage = body.get("usage")
    return _counts(usage) if isinstance(usage, dict) else (0, 0, 0)


def _counts(usage: Mapping[str, Any]) -> tuple[int, int, int]:
    """Prompt, completion and total tokens of a `usage` object (see `answer_tokens`)."""
    # (each whole number checked where it is read: every answer comes here)
    prompt, completion, total = (
        usage.get("prompt_tokens"),
        usage.get("completion_tokens"),
        usage.get("total_tokens"),
    )
    prompt = prompt if isinstance(prompt, int) and not isinstance(prompt, bool) else 0
    completion = completion if isinstance(completion, int) and not isinstance(completion, bool) else 0
    total = total if isinstance(total, int) and not isinstance(total, bool) else 0
    return prompt, completion, total or prompt + completion


def reports_usage(body: Any) -> bool:
    """Whether a body says it used tokens or cost something: an answer thrown away (empty,
    malformed, an error inside a 200) may, and is billed all the same."""
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return False
    cost = usage.get("cost")
    costs = isinstance(cost, int | float) and not isinstance(cost, bool) and cost > 0
    return costs or answer_tokens(body)[2] > 0
