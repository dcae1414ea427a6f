"""One process's part of its account's send log, by the hundredth of the store's clock.

A shared pace tells the store what it sent and what was refused, and when a refusal said the
server has room again, by the hundredth of a second of the store's clock, with whichever call
comes next (`pipeline.pace.link`), and when its oldest request unanswered left: the account's
limit is read from every process's log (`pipeline.pace.reading`) once the answers that may
change it are in. While the store is away the log is kept, up to LOG_MAX hundredths.
"""

from __future__ import annotations

LOG_MAX = 2_000  # hundredths of the send log held while the store is away


class AccountLog:
    def __init__(self) -> None:
        self.offset: float | None = None  # the store's clock on ours, minus ours
        self._log: dict[int, list[int]] = {}  # hundredth (the store's clock): [sent, refused, room]
        self.refusals = False  # the log holds a refusal not yet told
        self._out: dict[int, int] = {}  # hundredth (ours): requests sent then, not yet answered

    def sent(self, at: float) -> None:
        h = int(at * 100)
        self._out[h] = self._out.get(h, 0) + 1
        if self.offset is not None and len(self._log) < LOG_MAX:
            self._counts(at)[0] += 1

    def answered(self, sent_at: float) -> None:
        """The answer to a request sent at `sent_at` (ours) is in, a refusal or not."""
        h = int(sent_at * 100)
        if (n := self._out.get(h, 0)) > 1:
            self._out[h] = n - 1
        elif n:
            del self._out[h]

    def oldest(self, now: float, within: float) -> float:
        """When the oldest request sent in the last `within` seconds and unanswered left, on the
        store's clock (-1: none). Older, it is no refusal on its way (those take milliseconds), or
        one whose end is not told here (a 5xx; a refusal another scope reads)."""
        out, since = self._out, int((now - within) * 100)
        while out:  # (in the order they were sent)
            h = next(iter(out))
            if h >= since:
                return h / 100 + self.offset if self.offset is not None else -1.0
            del out[h]
        return -1.0

    def refused(self, sent_at: float, resume: float) -> float | None:
        """A request sent at `sent_at` was refused until `resume` (our clock); returns when
        it was sent on the store's clock, or None when it is not logged."""
        self.answered(sent_at)
        if self.offset is None or len(self._log) >= LOG_MAX:
            return None
        counts = self._counts(sent_at)
        counts[1] += 1
        room = int((resume + self.offset) * 100)
        counts[2] = min(counts[2], room) if counts[2] else room
        self.refusals = True
        return sent_at + self.offset

    def _counts(self, at: float) -> list[int]:
        """Sent, refused, and room (the earliest a refusal said the server has room again), of
        the hundredth of the store's clock that `at` (ours) falls in."""
        assert self.offset is not None
        return self._log.setdefault(int((at + self.offset) * 100), [0, 0, 0])

    def take(self) -> dict[int, list[int]]:
        """The log not yet told, to tell the store now."""
        log, self._log = self._log, {}
        self.refusals = False
        return log

    def untold(self, log: dict[int, list[int]]) -> None:
        """The store could not be told `log`: told when it is back."""
        for h, (n, m, w) in log.items():
            counts = self._log.setdefault(h, [0, 0, 0])
            counts[0], counts[1] = counts[0] + n, counts[1] + m
            counts[2] = min(counts[2], w) if counts[2] and w else counts[2] or w


def said(log: dict[int, list[int]]) -> str:
    """The log as the store's script takes it."""
    return " ".join(f"{h} {n} {m} {w}" for h, (n, m, w) in log.items())
