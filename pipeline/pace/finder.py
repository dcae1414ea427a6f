"""Finding a rate limit nobody states, from the fast signal: a refusal (429) comes back in
milliseconds, an answer in seconds, so refusals drive everything and answers are never waited for.

Once a server's count is full, it refuses every request sent after until it has room again: a
run of refusals in send order (`sendlog`). A run of four (more when scattered refusals are
common) says so; an aggregator's scattered 429s almost never line up so, and only delay their
own request. Then the pool pauses for the Retry-After and the pace is set at 97 % of what the
server let through (`capacity`). A pace that has held and binds climbs above the limit, to
learn whether it rose (`probe`). Refusals at the limit's pace read it again: at once when they
beat steadily (`Rhythm`); at most once in SETTLE seconds when it was read over under a second
or raised by a probe, or past 15 % of answers; scattered ones never do. A shared pace reads
the limit from what the whole account sent (`reading`). An endpoint failing every request is
down, not busy, and one that lets nothing through for long stops the run (`outage`); limits a
server states come first (`stated`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from pipeline.errors import RunStopped
from pipeline.pace import stated
from pipeline.pace.answers import HOLD_SHARE, Answers
from pipeline.pace.capacity import Capacity, Rhythm
from pipeline.pace.outage import Outage
from pipeline.pace.pacer import Pacer
from pipeline.pace.probe import SETTLE, Probe
from pipeline.pace.sendlog import SIZE, SendLog
from pipeline.pace.stated import MARGIN, MAX_PAUSE
from pipeline.pace.window import Window

# Refusals in a row, in send order: the server is full. Of 2 % scattered refusals, three in a
# row happen about once in 100,000 requests, four once in 6 million; more when scattered
# refusals are more common, so that they never line up so.
RUN, RUN_MAX = 4, 7
COMMON_AFTER = 50  # answers it takes to tell how common scattered refusals are
READ_SHARE, READ_MIN = 0.15, 8  # refusals at the limit's pace: it was read too high
HOLD = 0.97  # the pace, as a share of the known limit
WAIT = 1.0  # seconds to wait when a refusal does not say
WAIT_WORTH = 20  # requests at the pace: a refused probe's longer wait costs no more, waited out
MIN_RATE = 0.01  # requests a second (one in 100 s): less got through, and there is no limit to read
STALL, STALL_MAX = 2.0, 0.05  # a refusal's round trips (seconds at most) to stall for
GIVE_UP = 600.0  # seconds of nothing but refusals before the run stops


class RateFinder:
    def __init__(
        self,
        pacer: Pacer,
        window: Window | None,  # None: a model's scope (in flight is the account's to bound)
        *,
        ceiling: float | None = None,
        tpm_given: bool = False,
        give_up: float = GIVE_UP,
        stop: Callable[[RunStopped], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        say: Callable[[str], None] | None = None,
        log_size: int = SIZE,
    ) -> None:
        self.pacer = pacer
        self.window = window
        self.ceiling = ceiling  # requests a second allowed (by the user or the server)
        self.rpm_given, self.tpm_given = ceiling is not None, tpm_given  # the user's come first
        self.clock = clock
        self.log = SendLog(log_size)
        self.capacity = Capacity(self.log)
        self.outage = Outage(self, give_up, stop, say)
        self.limit: float | None = None  # requests a second the server was seen to accept
        self.cuts = 0
        self.answers = Answers(window, clock)
        self.epoch = 0  # the first request sent at the current pace
        self._epoch_start = clock()
        self.probe = Probe(HOLD)
        self.rhythm = Rhythm()
        self._reread_after = 0.0
        self._waits = 0
        # A shared pace's store, where the account's limit is read when none was given.
        self.account = pacer.account
        self.reads_account = self.account is not None and self.account.reads_account
        if self.account is not None and self.reads_account:
            self.account.watch(self._read)  # moments any process of the account saw it full

    @property
    def latency_cuts(self) -> int:
        return self.answers.latency_cuts

    def _new_epoch(self, now: float) -> None:  # a new pace is judged on what is sent at it
        self.epoch = self.log.next
        self._epoch_start = now
        self.probe.settle(now, self.pacer.request_rate)
        self.rhythm.restart()
        self.answers.restart(now)

    def sent(self, tag: int = 0) -> int:
        """A request (of the model numbered `tag`) leaves now; returns its ticket."""
        now = self.clock()
        if self.account is not None:
            self.account.sent(now)
        self.outage.sent()
        return self.log.send(now, tag)

    def forget(self) -> None:
        """The limit read here was a model's, which has a scope of its own now: the pace given
        or stated (else none), no pause, as if its refusals had not come."""
        self.limit = None
        self.answers.tally = [0, 0]
        self.capacity = Capacity(self.log)
        self.pacer.set_request_rate(self.ceiling)
        self.pacer.unpause()
        self._new_epoch(self.clock())

    def success(self, ticket: int, latency: float | None = None) -> None:
        self.answers.grow(latency)
        now = self.clock()
        self.outage.accepted()
        if self.account is not None and self.log.kept(ticket):  # (else its time is another's)
            self.account.answered(self.log.sent_at(ticket))
        if ticket < self.epoch:
            return
        self.answers.ok(now)
        if self.answers.step(now):
            self._probe(now)

    def answered(self, ticket: int) -> None:
        """An answer that says nothing of the rate (a 400), only that the endpoint is up."""
        self.outage.answered()
        if self.account is not None and self.log.kept(ticket):  # no refusal can come of it: no reading waits
            self.account.account_log.answered(self.log.sent_at(ticket))
        if ticket >= self.epoch:
            self.answers.other(self.clock())

    def failure(self, ticket: int, message: str = "", *, who: object = None, connected: bool = True) -> bool:
        """The endpoint failed a request (a 5xx, a dropped connection, a timeout); returns
        whether it is down as a whole, so that the failure spends no attempt."""
        # As a 400 (a 503 is told as refused), where the log still holds its time.
        if self.account is not None and self.log.kept(ticket) and not self.log.refused(ticket):
            self.account.account_log.answered(self.log.sent_at(ticket))
        if ticket >= self.epoch:
            self.answers.other(self.clock())
        return self.outage.failed(ticket, message, who=who, connected=connected)

    def pushback(self, ticket: int, wait: float | None, message: str = "") -> None:
        """The server refused a request (429, or 503 for overload), asking to wait `wait`."""
        now = self.clock()
        self.outage.refused(now, wait, message)
        if not self.log.kept(ticket):
            return
        self._uncount(ticket)
        self.log.refuse(ticket)
        if self.limit is None and self.window is not None:  # start nothing until its fellows show it full
            self.window.stall(min(STALL * (now - self.log.sent_at(ticket)), STALL_MAX))
        self.probe.charge(now, self.log.sent_at(ticket))
        pause = min(wait if wait is not None else WAIT, MAX_PAUSE)
        if self.account is not None:
            self.account.refused(self.log.sent_at(ticket), now + pause)
        if ticket < self.epoch:
            return  # sent before the last change of pace
        back, total = self.answers.refused(now)  # before this one
        first, last = self.log.run(ticket)
        first = max(first, self.epoch)  # a run at the pace in force, not one that began before
        # How common scattered refusals are (from enough answers: at a limit hit at once, the
        # first few are all refusals).
        common = back / total if total >= COMMON_AFTER else 0.0
        if last - first + 1 >= min(RUN + int(common / HOLD_SHARE), RUN_MAX):
            if wait is not None and wait >= self.outage.give_up:
                self.outage.refusing(now, wait, message)  # a quota spent for hours, not a rate
            self._full(now, first, pause)
            return
        back, total = back + 1, total + 1
        self.answers.hold(now, back, total)
        if self.limit is not None:
            self._overshoot(now, ticket, wait, back, total)

    def _full(self, now: float, first: int, pause: float) -> None:
        """A run of refusals: the server is full."""
        self.pacer.pause(pause)
        self.answers.drop_hold()
        self.cuts += 1
        if not self.reads_account:  # a shared pace's store sees the account full, and reads it
            self._read(self.capacity.read(first, now + pause), self.capacity.sure)
        self._new_epoch(now + pause)

    def _read(self, rate: float, sure: bool) -> None:
        self.capacity.sure = sure
        if rate >= MIN_RATE:
            if self.ceiling is not None:
                rate = min(rate, self.ceiling / MARGIN)
            first, self.limit = self.limit is None, rate
            self.answers.tally = [0, 0]
            self.pacer.set_request_rate(rate * HOLD)
            if first and self.window is not None:  # a bucket's savings may pass for it: a small window tells
                self.window.restart()
            elif self.window is not None:
                self.window.open()  # the pace bounds the rate from here
        elif self.window is not None:  # nothing got through: just wait (a hold's end must not undo it)
            self.answers.drop_hold()
            self.window.shrink()
        if self.reads_account:  # read where another process (or the store) saw it full
            self._new_epoch(self.clock())

    def _uncount(self, ticket: int) -> None:
        less = self.capacity.uncount(ticket)
        if less and self.limit is not None:
            self.limit = max(self.limit - less, MIN_RATE)
            if self.pacer.request_rate is not None and self.pacer.request_rate > self.limit * HOLD:
                self.pacer.set_request_rate(self.limit * HOLD)

    def _overshoot(self, now: float, ticket: int, wait: float | None, back: int, total: int) -> None:
        assert self.limit is not None
        current = self.pacer.request_rate
        if current is not None and current > self.limit * HOLD * 1.0001:
            self._probed_past(now, ticket, current, wait)
            return
        beat = None if self.reads_account else self.rhythm.refused(ticket, self.log)
        if beat is not None:  # the pace's own overshoot, not scattered refusals
            self._reread(beat, True)
            return
        many = back >= READ_MIN and total >= COMMON_AFTER and back >= READ_SHARE * total
        refused, answered = self.answers.tally
        many = self.rhythm.lasting(now, many) or (refused >= READ_MIN and refused >= READ_SHARE * answered)
        if self.capacity.sure and not many:
            return
        if now - self._epoch_start < 1.0 or now < self._reread_after:
            return
        # Refusals at the limit's pace: it was read too high, or over too short a time to be
        # sure. What gets through at this pace tells, read up to now (no pause to count here).
        self._reread_after = now + SETTLE
        if self.account is not None and self.reads_account:
            self.account.read_full(self.log.sent_at(ticket), now, self._reread)
        else:
            self._reread(self.capacity.read(ticket, now), self.capacity.sure)

    def _probed_past(self, now: float, ticket: int, current: float, wait: float | None) -> None:
        """A probe above the limit was refused: back under it (scattered refusals never take
        the pace below it), and under what got through in the server's last second, if
        more: the limit rose that far at least (or a bucket's savings passed for a rise: the
        limit is a guess then, that the next refusals read again)."""
        assert self.limit is not None
        at = self.log.sent_at(ticket)
        # A server counting per second has room again when its second ends: the second it
        # counted is the one before that (the one before the refusal spans two, and reads too
        # high). Until then it refuses all: the pool waits, or a run would read that second.
        rest = wait if wait is not None and wait < 1.0 else 0.0
        count = self.log.accepted(self.log.since(at + rest - 1.0, ticket), ticket)
        if count >= RUN and min(count, current) > self.limit:  # (a request or two: a slow rate's chance)
            self.limit = min(float(count), current)
            self.capacity.sure = False
        hold = self.limit * HOLD
        self.pacer.set_request_rate(hold)
        if wait is not None and wait * hold <= WAIT_WORTH:  # a slow pace: wait a minute's window out
            rest = min(wait, MAX_PAUSE)
        if rest:
            self.pacer.pause(rest)
        self.probe.refused(now, hold)
        self.cuts += 1
        self._new_epoch(now)

    def _reread(self, rate: float, sure: bool) -> None:
        """The limit read again at its pace: only ever lowered here."""
        self.capacity.sure = sure
        if self.limit is not None and MIN_RATE <= rate < self.limit:
            self.limit = rate
            self.answers.tally = [0, 0]
            self.pacer.set_request_rate(rate * HOLD)
            self.cuts += 1
            self._new_epoch(self.clock())

    def _probe(self, now: float) -> None:
        # The pacer holds requests back: some had to wait for it since, or some wait now
        # (at the end of a job every request left may be waiting, and none comes to wait).
        binding = self.pacer.waits > self._waits or self.pacer.holding
        self._waits = self.pacer.waits
        if self.limit is None or self.pacer.request_rate is None or not binding:
            return
        if self.reads_account and self.account is not None and not self.account.budget.leads:
            # Another's reading is in force: it probes, for all. Started from this one's, lower, a
            # probe is under the pace in force, and published took every process down (431 of 987).
            return
        if self.reads_account and not self.probe.climbing:
            # A shared pace's limit is the one in force, maybe another's reading (its process gone,
            # this one leads): from ours, lower, the probe (or its refusal) took the account down
            # to it (417 of 970); higher, it began 30 % over.
            self.limit = self.pacer.request_rate / HOLD
        rate = self.probe.next(now, self.limit)
        if rate is None:
            return
        if self.ceiling is not None:
            rate = min(rate, self.ceiling)
        self.pacer.set_request_rate(rate)

    def headers(self, headers: Mapping[str, str]) -> None:
        stated.read(self, headers)
