"""The limits a server states, in its `x-ratelimit-*` headers.

Where the server states its limits they are used instead of the ones read from refusals: the
stated limit becomes the rate, and an exhausted budget pauses the pool until it resets. The
user's own `--rpm` / `--tpm` come first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pipeline.send.waits import parse_duration, per_minute, spent

if TYPE_CHECKING:
    from pipeline.pace.finder import RateFinder

MARGIN = 0.98  # of a limit the server or the user states
MAX_PAUSE = 120.0


def per_second(limit: float | None) -> float | None:
    """A limit stated or given per minute, as the pace a second a little under it."""
    return limit / 60 * MARGIN if limit else None


def read(finder: RateFinder, headers: Mapping[str, str]) -> None:
    """Use the limits a server states (per minute, as OpenAI states them) where the user gave
    none, as the finder's `ceiling` and pace; pause when one is used up, until it resets."""
    pacer, window = finder.pacer, finder.window
    if not finder.rpm_given:
        rate = per_second(per_minute(headers.get("x-ratelimit-limit-requests")))
        if rate and rate != finder.ceiling:
            finder.ceiling = rate
            pacer.state_request_rate(rate)
            if window is not None:
                window.open()
    if not finder.tpm_given:
        rate = per_second(per_minute(headers.get("x-ratelimit-limit-tokens")))
        if rate and rate != pacer.token_rate:
            pacer.set_token_rate(rate)
            if window is not None:
                window.open()
    for kind in ("requests", "tokens"):
        if spent(headers.get(f"x-ratelimit-remaining-{kind}")):
            reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
            if reset:
                pacer.pause(min(reset, MAX_PAUSE))
