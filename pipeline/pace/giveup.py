"""When to stop asking: a server that lets nothing through for long, or says it will not.

When the server lets nothing through for `give_up` seconds (only refusals since, and not one
request sent since that it has not refused), or a run of refusals asks to wait longer than
that (a daily quota spent), the run stops (exit 3) with the time to resume; a model's scope
gives up its model alone (`pipeline.pace.scopes`), and the run goes on.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from pipeline.errors import RunStopped
from pipeline.pace.sendlog import SendLog
from pipeline.run.progress import duration


class GiveUp:
    def __init__(self, log: SendLog, give_up: float, stop: Callable[[RunStopped], None] | None) -> None:
        self.log = log
        self.give_up = give_up
        self.stop = stop
        self.model: str | None = None  # whose requests (None: the account's, the whole run's)
        self._since: tuple[float, int] | None = None  # refused since, and from which request

    def accepted(self) -> None:
        self._since = None

    def refused(self, now: float, wait: float | None, message: str) -> None:
        """A refusal came back: stop if the server let nothing through for `give_up` seconds,
        only refusals answered since then, and not one request sent since (a second ago or
        more, time enough to be refused) that it has not refused: an answer on its way counts."""
        if self._since is None:
            self._since = (now, self.log.next)
            return
        since, first = self._since
        if now - since < self.give_up:
            return
        if self.log.accepted_in(first, now - 1.0):
            self._since = (now, self.log.next)  # it did let some through: count afresh
        else:
            self.now(now, wait, message)

    def now(self, now: float, wait: float | None, message: str) -> None:
        """The server lets nothing through for long, or says it will not for long: stop."""
        if self.stop is None:
            return
        said = f" ({message})" if message else ""
        refused_for = now - (self._since or (now, 0))[0]
        if wait is not None and wait >= 1.0:
            until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=wait)
            when = f"it asks to wait {duration(wait)}, until {until:%Y-%m-%d %H:%M} UTC"
        else:
            when = "it gives no time"
        whose = f" for {self.model}" if self.model else ""
        resume = "" if self.model else "; run the same command again then to resume"
        self.stop(
            RunStopped(
                f"the server refuses every request{whose}{said}, for {duration(refused_for)} so far: "
                f"a rate limit or quota is spent and {when}{resume}",
                code="rate_limited",
            )
        )
        self.stop = None  # once
