"""The tokens a process holds of its account's shared token pace (`pipeline.pace.leased`).

The store leases tokens as it leases starts: `n` tokens are the stretch of the account's token
timeline from `start` on, `n / rate` long, and no two processes' stretches overlap. A process
spends its leases at the account's rate, as the local pacer spends its own budget (GCRA): a
request of `t` tokens may start when the first of them is due, and moves the lease on by
`t / rate`; a request that spans two leases waits until its tokens of the second are due too.
Tokens left unspent LATE seconds past their time are gone: spent late, they would add to the
stretch of another process (as a leased start left unused is).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

LATE = 0.1  # seconds a leased start (or token) may still be used after its time


@dataclass(slots=True)
class _Lease:
    due: float  # when its next token is, on the loop's clock
    left: float  # tokens


class TokenLeases:
    """Leased tokens in hand, spent at `rate`: the account's tokens a second, set by the pace
    that holds them."""

    def __init__(self) -> None:
        self.rate = 0.0
        self._leases: deque[_Lease] = deque()  # in the account's order: none overlaps the next
        self._owed = 0.0  # spent with nothing in hand: taken off the next lease

    @property
    def held(self) -> float:
        return sum(lease.left for lease in self._leases) - self._owed

    def add(self, start: float, tokens: float) -> None:
        """A lease of `tokens` from `start` (on the loop's clock)."""
        paid = min(tokens, self._owed)
        self._owed -= paid
        if tokens > paid:
            self._leases.append(_Lease(start + paid / self.rate, tokens - paid))

    def ready_at(self, tokens: float, now: float) -> float | None:
        """When a request of `tokens` may start (None: not enough in hand)."""
        self._expire(now)
        if self.held < tokens:
            return None
        at = before = 0.0
        for lease in self._leases:
            at = max(at, lease.due - before / self.rate)
            before += lease.left
            if before >= tokens:
                break
        return at

    def take(self, tokens: float, start: float) -> None:
        """A request of `tokens` starts at `start` (as `ready_at` allowed)."""
        while tokens > 0 and self._leases:
            lease = self._leases[0]
            spent = min(tokens, lease.left)
            lease.due = max(lease.due, start) + spent / self.rate
            lease.left -= spent
            tokens -= spent
            start += spent / self.rate
            if lease.left <= 0:
                self._leases.popleft()
        self._owed += tokens

    def charge(self, tokens: float) -> None:
        """An answer the server counted at more than its request took: the rest comes off
        what is in hand, as if it had been taken then."""
        self.take(tokens, -math.inf)

    def give_back(self, tokens: float, now: float) -> None:
        """Tokens taken for a request the server did not count: in hand again, due now."""
        paid = min(tokens, self._owed)
        self._owed -= paid
        if tokens > paid:
            self._leases.appendleft(_Lease(now, tokens - paid))

    def clear(self) -> None:
        self._leases.clear()
        self._owed = 0.0

    def _expire(self, now: float) -> None:
        late = now - LATE
        for lease in self._leases:
            if lease.due < late:
                lease.left -= (late - lease.due) * self.rate
                lease.due = late
        if any(lease.left <= 0 for lease in self._leases):
            self._leases = deque(lease for lease in self._leases if lease.left > 0)
