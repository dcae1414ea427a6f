"""How the server counts a request's tokens against its token limit, as the run learns it.

OpenAI charges a request's prompt and all its answer may use (`max_tokens` times `n`) when it
arrives; others count what the answer used. Handing back each reservation's unused part sends
some 1.5x the first kind's limit (a 429 storm); keeping it whole uses only used/reserved of
the second kind's. Nothing in an answer says which kind a server is, so:

- **Keep, then probe.** Reservations are kept whole at first, safe on either kind. Once the
  token pace has bound `PROBE_AFTER` seconds with none refused, a share of each unused part is
  handed back, growing to all of it over `RAMP` seconds. A server counting on arrival is then
  over at once, and its first token refusal (within a second of the ramp's end) ends the
  probe: whole again, the hand-backs taken back (it still counts them), the next probe a
  minute later, then longer.
- **Usage.** All handed back at a binding pace for `CONFIRM` seconds with no flood says the
  server counts usage. A flood (`FLOOD` token refusals within a second) says it was fooled (a
  bucket or a minute's window had room for the probe): whole again, the last minute's
  hand-backs taken back.
- **Counting more.** A lone token refusal at a pace that should fit says the server counts more
  than is reserved (its own prompt estimate), or its windows are coarse enough to spill over
  now and then: each adds `STEP` to every count (half that when counting usage, the answer's
  own count; once a second at most), up to `MOST`.

The pacer keeps the clock and a `TokenCount` with these rules (`counted`, `refused`).
"""

from __future__ import annotations

import math
import re
import time
from collections import deque
from collections.abc import Callable, Mapping
from enum import Enum

PROBE_AFTER = 0.5  # seconds of a binding token pace, none refused, before the first probe
PROBE_AGAIN = 60.0  # after a probe that met a refusal, doubling each time
RAMP = 1.0  # seconds for the share handed back to grow from none to all
CONFIRM = 2.0  # seconds of handing all of it back at a binding pace, no flood refused
WINDOW = 1.0  # seconds past the ramp a refusal is still the probe's (a window of a second)
FLOOD = 3  # token refusals within a second: the pace is well over the limit
TAKE_BACK = 60  # seconds of hand-backs a refusal takes back (a minute's window counts them all)
STEP, MOST = 0.02, 1.25  # counting more after a lone refusal, and at most
SAYS_TOKENS = re.compile(r"\btokens?\b", re.IGNORECASE)


class Counting(Enum):
    ARRIVAL = "reservations kept whole, as a server counts on arrival"
    PROBE = "handing back the unused part, to learn whether the server counts usage"
    USAGE = "the unused part handed back: the server counts what answers use"


def says_tokens(message: str, headers: Mapping[str, str] | None) -> bool:
    """Whether a refusal is the token limit's: its message says so ("Rate limit reached for
    ... on tokens per min"), or its headers."""
    if headers and headers.get("x-ratelimit-remaining-tokens", "").strip() in ("0", "0.0"):
        return True
    return bool(SAYS_TOKENS.search(message))


class TokenCount:
    """`probe`: learn whether the server counts usage (else reservations are kept whole)."""

    def __init__(self, *, probe: bool = True, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.counting = Counting.ARRIVAL
        self.factor = 1.0  # every count times this (`refused`)
        self._wait = PROBE_AFTER if probe else math.inf  # quiet at a binding pace it takes to probe
        self._quiet_since: float | None = None  # since when the pace binds, none refused
        self._probe_start = 0.0
        self._bumped = -math.inf
        self._refusals: deque[float] = deque()  # when, the last FLOOD
        self._handed: deque[list[float]] = deque()  # [second, tokens] handed back in it

    def _share(self, now: float) -> float:
        """How much of a reservation's unused part comes back now."""
        if self.counting is Counting.PROBE:
            return min((now - self._probe_start) / RAMP, 1.0)
        return 1.0 if self.counting is Counting.USAGE else 0.0

    def counted(self, reserved: int, used: int, *, binding: bool) -> int:
        """What a request that reserved `reserved` and used `used` counts, as far as the run
        knows; `binding`: the pace holds requests back now (only then does a refusal, or
        none, say anything of the limit)."""
        if not reserved:
            return 0
        now = self.clock()
        self._learn(now, binding)
        # Counting more applies here, not to the reservation: the requests queued at the pace
        # reserved before a refusal said so, and would go on at the old pace for as long as
        # the queue takes to drain (15 s at 256 in flight and 16 a second).
        charged, used = math.ceil(reserved * self.factor), math.ceil(used * self.factor)
        back = (charged - used) * self._share(now) if used else 0  # no usage stated: none known
        if back <= 0:
            return max(used, charged)  # more than reserved: any server counts that much
        second = math.floor(now)
        if self._handed and self._handed[-1][0] == second:
            self._handed[-1][1] += back
        else:
            self._handed.append([second, back])
            while self._handed[0][0] <= second - TAKE_BACK:
                self._handed.popleft()
        return charged - int(back)

    def _learn(self, now: float, binding: bool) -> None:
        if not binding:
            # Handing back says nothing while the pace does not bind: the probe starts over.
            self._quiet_since = None
            self._probe_start = now
            return
        if self._quiet_since is None:
            self._quiet_since = now
        quiet = now - self._quiet_since
        if self.counting is Counting.ARRIVAL and quiet >= self._wait:
            self.counting, self._probe_start = Counting.PROBE, now
        elif self.counting is Counting.PROBE and now - self._probe_start >= RAMP and quiet >= RAMP + CONFIRM:
            self.counting = Counting.USAGE

    def refused(self) -> int:
        """The token limit refused a request; returns the tokens to count again: those handed
        back in the belief that the server counts usage, when it does not."""
        now = self.clock()
        self._quiet_since = None
        self._refusals.append(now)
        if len(self._refusals) > FLOOD:
            self._refusals.popleft()
        flood = len(self._refusals) == FLOOD and now - self._refusals[0] <= 1.0
        # What the ramp sent over a limit is refused by the end of the window it fell in.
        probing = self.counting is Counting.PROBE and now - self._probe_start < RAMP + WINDOW
        if probing or (flood and self.counting is not Counting.ARRIVAL):
            self.counting = Counting.ARRIVAL
            self._wait = max(PROBE_AGAIN, 2 * self._wait)
            taken = sum(tokens for _, tokens in self._handed)
            self._handed.clear()
            return int(taken)
        if now - self._bumped >= 1.0:
            self._bumped = now
            # Usage is the answer's own count: a lone refusal is the window's coarseness.
            self.factor = min(self.factor + STEP / (2 if self.counting is Counting.USAGE else 1), MOST)
        return 0
