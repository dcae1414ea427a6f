"""When the endpoint lets nothing through: down, or refusing (one `Outage` a scope).

A refused connection, a timeout, a 5xx: one is one request's bad luck, and spends an attempt
of it. The endpoint is down when every request out when such a failure came back has failed
since, `MIN` at least, nothing answering between (an endpoint that goes fails all in flight);
or when failures alone have come back for `QUIET` seconds (a network dropping packets: new
connections time out, older requests hang). They must come from `MIN` requests unless the last
could not even connect: one request failing again and again is as likely a poison request, and
taken for an outage it would never fail (the run would stop, on every resume). Until something
answers, the pool pauses (a second, doubling while probes find it down, up to ten) and only
`PROBES` requests go at a time: an outage costs a few requests every few seconds, not the
window. A failure spends no attempt then (marked `outage`, retried as a refusal is), and after
--give-up-after the run stops (exit 3, resumable). Any other answer (a success, a 429, a 400)
says it is up; one request failing while others succeed, or one model's while another's
answer (an upstream down), is no outage.

A server that lets nothing through for --give-up-after (only refusals, none sent since that it
has not refused), or asks in a run of refusals to wait longer (a daily quota spent), stops the
run (exit 3) with the time to resume; a model's scope gives up its model alone (`scopes`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TYPE_CHECKING

from pipeline.errors import RunStopped
from pipeline.run.progress import duration

if TYPE_CHECKING:
    from pipeline.pace.finder import RateFinder

# Failures in a row, at least, that say the endpoint is down (with every request that was out
# failing too): of an endpoint failing 8 % of requests, five in a row come once in 300,000
# answers, and only with at most one request out at a time.
MIN = 5
QUIET = 30.0  # seconds of failures, nothing answering, that say it is down all the same
PAUSE, MAX_PAUSE = 1.0, 10.0  # seconds between probes, doubling while it stays down
PROBES = 2  # requests in flight at a time while it is down


class Outage:
    """A scope's finder's: its pace paused, its window cut, judged from its send log."""

    def __init__(
        self,
        finder: RateFinder,
        give_up: float,
        stop: Callable[[RunStopped], None] | None,
        say: Callable[[str], None] | None,
    ) -> None:
        self.model: str | None = None  # whose requests it judges refusing (None: the run's)
        self.pacer, self.window, self.log, self.clock = finder.pacer, finder.window, finder.log, finder.clock
        self.give_up, self.stop, self.say = give_up, stop, say
        self.down = False
        self.outages = 0  # times the endpoint went down in this run
        self._since = 0.0  # the streak's first failure: when it went down, once it is
        self._pause = PAUSE
        self._probes_from = 0  # requests sent from here on left after the last pause began
        self._window: tuple[float, float] = (0.0, 0.0)  # the window's size before, to give back
        self.out = 0  # requests sent and not answered yet
        self._streak = 0  # failures since the last answer
        self._before = 0  # the first request sent after the streak's first failure came back
        self._outstanding = 0  # requests out then
        self._failed_before = 0  # of those, failed since
        self._who: set[object] = set()  # the requests that failed in the streak (MIN at most)
        self._refused: tuple[float, int] | None = None  # refused since, and from which request

    def sent(self) -> None:
        self.out += 1

    def answered(self) -> None:
        self.out -= 1
        self._streak = 0
        if self.down:
            self._up()

    def failed(self, ticket: int, message: str, *, who: object = None, connected: bool = True) -> bool:
        """The endpoint failed attempt `ticket` of request `who` (by default its own);
        `connected`: a connection was made. Returns whether the endpoint is down."""
        now = self.clock()
        self.out -= 1
        self._streak += 1
        if self._streak == 1:
            self._since = now
            self._before, self._outstanding, self._failed_before = self.log.next, self.out, 0
            self._who.clear()
        elif ticket < self._before:
            self._failed_before += 1
        if len(self._who) < MIN:
            self._who.add(ticket if who is None else who)
        if self.down:
            if ticket >= self._probes_from:  # a probe, sent after the last pause began
                self._still_down(now, message)
            return True
        nobody = len(self._who) >= MIN or not connected  # no one request's fault
        if (
            self._streak >= MIN
            and nobody
            and (self._failed_before >= self._outstanding or now - self._since >= QUIET)
        ):
            self.down = True
            self.outages += 1
            self._pause = PAUSE
            if self.window is not None:  # (a model's scope has none, and is never down: the account is)
                self._window = self.window.cut(PROBES)
            self._hold(now)
            if self.say is not None:
                self.say(
                    f"pipeline: the endpoint fails every request ({message}): pausing, then probing "
                    f"with {PROBES} requests at a time; none spends an attempt until it answers again"
                )
            return True
        return False

    def _still_down(self, now: float, message: str) -> None:
        if now - self._since >= self.give_up:
            self._give_up(now, message)
            return
        self._pause = min(self._pause * 2, MAX_PAUSE)
        self._hold(now)

    def _hold(self, now: float) -> None:
        left = self._since + self.give_up - now
        self.pacer.pause(max(min(self._pause, left), 0.0))
        self._probes_from = self.log.next

    def _up(self) -> None:
        self.down = False
        if self.window is not None:
            self.window.restore(self._window)
        if self.say is not None:
            self.say(f"pipeline: the endpoint answers again, after {duration(self.clock() - self._since)}")

    def _give_up(self, now: float, message: str) -> None:
        self._stop(
            f"the endpoint has failed every request for {duration(now - self._since)} (the "
            f"last: {message}): it is down, or unreachable from here; run the same command "
            "again to resume once it answers",
            "endpoint_down",
        )

    def _stop(self, text: str, code: str) -> None:
        if self.stop is not None:
            self.stop(RunStopped(text, code=code))
            self.stop = None  # once

    def accepted(self) -> None:
        """A request got through: the endpoint is up, and lets some through."""
        self._refused = None
        self.answered()

    def refused(self, now: float, wait: float | None, message: str) -> None:
        """A refusal came back: stop if the server let nothing through for `give_up` seconds,
        nor any request sent since (a second ago or more, time to be refused): one on its way
        may be an answer."""
        if self._refused is None:
            self._refused = (now, self.log.next)
            return
        since, first = self._refused
        if now - since < self.give_up:
            return
        if self.log.accepted(first, self.log.since(now - 1.0, self.log.next)):
            self._refused = (now, self.log.next)  # it did let some through: count afresh
        else:
            self.refusing(now, wait, message)

    def refusing(self, now: float, wait: float | None, message: str) -> None:
        """The server lets nothing through (for long, or for hours, as it says): stop."""
        said = f" ({message})" if message else ""
        refused_for = now - (self._refused or (now, 0))[0]
        if wait is not None and wait >= 1.0:
            until = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=wait)
            when = f"it asks to wait {duration(wait)}, until {until:%Y-%m-%d %H:%M} UTC"
        else:
            when = "it gives no time"
        whose = f" for {self.model}" if self.model else ""
        resume = "" if self.model else "; run the same command again then to resume"
        self._stop(
            f"the server refuses every request{whose}{said}, for {duration(refused_for)} so far: "
            f"a rate limit or quota is spent and {when}{resume}",
            "rate_limited",
        )
