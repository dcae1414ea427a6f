"""The limits a server states, in its `x-ratelimit-*` headers.

Where the server states its limits they are used instead of the ones read from refusals: the
stated limit becomes the rate, and an exhausted budget pauses the pool until it resets. The
user's own `--rpm` / `--tpm` come first.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.pace.pacer import Pacer
from pipeline.pace.window import Window
from pipeline.send.waits import parse_duration, per_minute, spent

MARGIN = 0.98  # of a limit the server or the user states
MAX_PAUSE = 120.0


def _per_second(stated: str | None) -> float | None:
    limit = per_minute(stated)
    return None if limit is None else limit / 60 * MARGIN


class Stated:
    def __init__(self, pacer: Pacer, window: Window, *, rpm_given: bool, tpm_given: bool) -> None:
        self.pacer = pacer
        self.window = window
        self.rpm_given = rpm_given
        self.tpm_given = tpm_given

    def read(self, headers: Mapping[str, str], ceiling: float | None) -> float | None:
        """Use the limits a server states (per minute, as OpenAI states them) where the user
        gave none; pause when one is used up, until it resets. Returns the requests a second
        allowed, `ceiling` as it was unless the server states a new one."""
        if not self.rpm_given:
            per_second = _per_second(headers.get("x-ratelimit-limit-requests"))
            if per_second and per_second != ceiling:
                ceiling = per_second
                self.pacer.state_request_rate(per_second)
                self.window.open()
        if not self.tpm_given:
            per_second = _per_second(headers.get("x-ratelimit-limit-tokens"))
            if per_second and per_second != self.pacer.token_rate:
                self.pacer.set_token_rate(per_second)
                self.window.open()
        for kind in ("requests", "tokens"):
            if spent(headers.get(f"x-ratelimit-remaining-{kind}")):
                reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}"))
                if reset:
                    self.pacer.pause(min(reset, MAX_PAUSE))
        return ceiling
