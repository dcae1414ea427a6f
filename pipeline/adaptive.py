"""Finding a rate limit nobody stated, the way TCP finds a link's capacity.

The signal is the server pushing back (429, or 503 for overload), read as a trend in the
answers to what was sent since the last change of pace, never one by one: behind an
aggregator a scattered 429 from one upstream says little about our own rate and only delays
its own request (by its Retry-After, in the retry policy).

- A strong trend (15 % of answers pushed back) means the server is saturated. What it lets
  through meanwhile *is* its limit: the requests sent less those refused, per second (not the
  successes, which for a slow model arrive long after the refusals). The pool pauses for the
  Retry-After, the in-flight window halves, and the rate is set just under that limit. If
  nearly nothing got through, that says nothing about a limit: the pool only pauses.
- Once a limit is known, and ten seconds after any change of pace, the rate creeps up by
  0.2 % a second while the pacer is what holds requests back, to learn whether the limit
  has risen. A mild trend above the
  known limit (1 %) sets it back just under the limit, with no pause: overshoot stays small,
  and scattered 429s cannot ratchet the rate down, since it is never cut below the limit.
- Until a limit is found, requests are not paced at all: one check each, no timer.

When nearly every answer is a transient failure (5xx, dropped connections, timeouts; a 400 or a
404 says nothing about the endpoint's health), the endpoint is down
rather than busy: the pool pauses, for one second and then twice as long each time the
outage persists (up to a minute), so that each request's few quick retries are spread over
the outage instead of being spent in its first seconds.

Rising latency is the other sign of a server pushed too hard: it queues rather than refuses.
But an LLM's latency also rises with longer answers or a busier provider, and cutting the
window then would only cost throughput. So the sign is read as Little's law has it: once a
second, the median latency, the mean number in flight and the answers a second are compared
with their usual values (moving averages of those readings). When more in flight bought no
more answers, only twice the latency, twice in a row, the extra requests were queueing: the
window gives up a quarter, then grows by one a round trip again.

Where the server states its limits (`x-ratelimit-*` headers) they are used instead: the
stated limit becomes the rate, and an exhausted budget pauses the pool until it resets.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pipeline.limits import Pacer, Window

BUCKET = 0.1  # seconds per bucket of the sliding window
BUCKETS = 20  # two seconds of answers
STRONG_SHARE, STRONG_MIN = 0.15, 8  # saturated: a limit is found (or has dropped)
HOLD_SHARE, HOLD_MIN = 0.05, 3  # more than scattered: stop growing the window quickly...
HOLD_FOR = BUCKET * BUCKETS  # ...for as long as it takes a trend to show, then grow again
MILD_SHARE, MILD_MIN = 0.01, 2  # overshoot above a known limit
HOLD = 0.97  # the pace, as a share of the known limit
STEP = 0.002  # growth a second while probing
SETTLE = 10.0  # seconds at the new pace after a change, before probing again
OUTAGE_SHARE, OUTAGE_MIN = 0.8, 10  # nearly every answer failed: the endpoint is down
OUTAGE_PAUSE, OUTAGE_MAX = 1.0, 60.0
MARGIN = 0.98  # of a limit the server or the user states
MAX_PAUSE = 120.0
MIN_RATE = 0.5  # requests a second: less got through, and there is no limit to read
LATENCY_SAMPLES = 16  # answers a latency reading needs, at least
LATENCY_RISE = 2.0  # queueing: latency this many times the usual...
CROWD_RISE = 1.5  # ...with this many times the usual in flight...
GAIN_MAX = 1.25  # ...for at most this many times the usual answers a second...
LATENCY_AFTER = 2  # ...in this many readings in a row
LATENCY_KEEP = 0.75  # of the window, at such a rise
LATENCY_MEMORY = 0.1  # weight of each reading in the usual values (about ten seconds)

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_reset(value: str) -> float | None:
    """`x-ratelimit-reset-*` values such as "1s", "6m0s", "20ms" or a plain "0.5"."""
    try:
        return float(value)
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    return sum(float(n) * _UNIT[u] for n, u in parts) if parts else None


def _per_second(per_minute: str | None) -> float | None:
    try:
        value = float(per_minute) if per_minute else 0.0
    except ValueError:
        return None
    return value / 60 * MARGIN if value > 0 else None


@dataclass(frozen=True, slots=True)
class Reading:
    latency: float  # median, seconds
    crowd: float  # mean in flight
    rate: float  # answers a second

    def toward(self, other: Reading, weight: float) -> Reading:
        return Reading(
            self.latency + weight * (other.latency - self.latency),
            self.crowd + weight * (other.crowd - self.crowd),
            self.rate + weight * (other.rate - self.rate),
        )


class LatencyWatch:
    """Each second's answers, read against the usual: latency, in flight, answers a second."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.samples: list[float] = []
        self.crowd = 0  # in flight at each answer, summed
        self.usual: Reading | None = None
        self._since = clock()
        self._high = 0

    def restart(self, at: float) -> None:
        """A new pace from `at`: readings start over (the usual values stay)."""
        self.samples.clear()
        self.crowd = 0
        self._since = at
        self._high = 0

    def add(self, latency: float, in_flight: int) -> None:
        self.samples.append(latency)
        self.crowd += in_flight

    def queueing(self, now: float) -> bool:
        """Once a second: did more in flight buy only latency, for long enough?"""
        if now < self._since:  # answers to what was sent before a pause that is not over
            self.restart(self._since)
            return False
        n = len(self.samples)
        if n < LATENCY_SAMPLES:
            return False  # too few to say: keep them for the next reading
        median = sorted(self.samples)[n // 2]
        reading = Reading(median, self.crowd / n, n / max(now - self._since, 1e-3))
        self.samples.clear()
        self.crowd = 0
        self._since = now
        usual = self.usual
        self.usual = reading if usual is None else usual.toward(reading, LATENCY_MEMORY)
        if usual is None or not (
            reading.latency > LATENCY_RISE * usual.latency
            and reading.crowd > CROWD_RISE * usual.crowd
            and reading.rate < GAIN_MAX * usual.rate
        ):
            self._high = 0
            return False
        self._high += 1
        if self._high < LATENCY_AFTER:
            return False
        self._high = 0
        return True


class RateFinder:
    def __init__(
        self,
        pacer: Pacer,
        window: Window,
        *,
        ceiling: float | None = None,
        tpm_given: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.pacer = pacer
        self.window = window
        self.ceiling = ceiling  # requests a second allowed (by the user or the server)
        self.rpm_given = ceiling is not None
        self.tpm_given = tpm_given
        self.clock = clock
        self.limit: float | None = None  # requests a second the server was seen to accept
        self.cuts = 0
        self.latency = LatencyWatch(clock)
        self.latency_cuts = 0
        self.epoch = 0  # changes with every change of pace; answers report the one they were sent in
        self._epoch_start = clock()
        self._ok = [0] * BUCKETS
        self._taken = [0] * BUCKETS  # successes of any epoch: what the server counted
        self._sent = [0] * BUCKETS
        self._back = [0] * BUCKETS
        self._fail = [0] * BUCKETS
        self._all = [0] * BUCKETS
        self.outages = 0
        self._unread = False  # the last saturation let too little through to read a limit
        self._outage_pause = OUTAGE_PAUSE
        self._bucket = 0
        self._next_step = 0.0
        self._probe_after = 0.0
        self._waits = 0
        self._held: tuple[float, float] | None = None  # since when, and the threshold before
        self._hold_spent = False  # a hold lapsed in this epoch: the pushback is scattered

    # -- the sliding window of answers ---------------------------------------------------------

    def _slot(self, now: float) -> int:
        bucket = int(now / BUCKET)
        if bucket != self._bucket:
            for b in range(max(self._bucket + 1, bucket - BUCKETS + 1), bucket + 1):
                i = b % BUCKETS
                self._ok[i] = self._sent[i] = self._back[i] = self._fail[i] = self._all[i] = 0
                self._taken[i] = 0
            self._bucket = bucket
        return bucket % BUCKETS

    def _new_epoch(self, now: float) -> None:
        """Judge the new pace on the answers to what is sent at that pace, not before."""
        self.epoch += 1
        self._epoch_start = now
        self._probe_after = now + SETTLE
        # A hold belongs to the pace it was judged at: end it, and let the new pace have its own.
        self._end_hold()
        self._hold_spent = False
        self.latency.restart(now)  # answers from before the change say nothing of it
        for j in range(BUCKETS):
            self._ok[j] = self._sent[j] = self._back[j] = self._fail[j] = self._all[j] = 0

    def _span(self, now: float) -> float:
        """Seconds the window of answers covers: at least one, as servers count."""
        return min(max(now - self._epoch_start, 1.0), BUCKET * BUCKETS)

    def _accepted(self, now: float, *, in_flight: int) -> float:
        """What the server let through a second over the window: the requests sent less
        those refused and those still in flight (which may yet be refused), or, where more,
        the successes. Those count whenever they were sent: a request sent before a pause
        that arrives after the server's count restarts takes its share of that count as
        much as one sent after, and leaving it out halved the limit found."""
        span = self._span(now)
        current = int(now / BUCKET)  # (callers have just moved the window to `now`)
        first = max(int((now - span) / BUCKET), current - BUCKETS + 1)
        taken = sum(self._taken[b % BUCKETS] for b in range(first, current + 1))
        return max(sum(self._sent) - sum(self._back) - in_flight, taken) / span

    def sent(self, epoch: int) -> None:
        """A request leaves now."""
        if epoch == self.epoch:
            self._sent[self._slot(self.clock())] += 1

    # -- answers -------------------------------------------------------------------------------

    def success(self, epoch: int, latency: float | None = None) -> None:
        self.window.grow()
        if latency is not None:
            self.latency.add(latency, self.window.in_flight)
        now = self.clock()
        i = self._slot(now)
        self._taken[i] += 1
        if epoch != self.epoch:
            return
        self._ok[i] += 1
        self._all[i] += 1
        if now >= self._next_step:
            self._next_step = now + 1.0
            self._lapse_hold(now)
            self._read_latency(now)
            self._probe(now)

    def answered(self, epoch: int) -> None:
        """An answer that says nothing about the endpoint (a 400 for a bad request)."""
        if epoch == self.epoch:
            self._all[self._slot(self.clock())] += 1

    def failure(self, epoch: int) -> None:
        """A transient failure: a 500, a dropped connection, a timeout..."""
        if epoch != self.epoch:
            return
        now = self.clock()
        i = self._slot(now)
        self._fail[i] += 1
        self._all[i] += 1
        failed = sum(self._fail)
        if failed >= OUTAGE_MIN and failed >= OUTAGE_SHARE * sum(self._all):
            if sum(self._ok) == 0 and self.outages:
                self._outage_pause = min(self._outage_pause * 2, OUTAGE_MAX)  # still down
            else:
                self._outage_pause = OUTAGE_PAUSE
            self.outages += 1
            self.pacer.pause(self._outage_pause)
            self._new_epoch(now + self._outage_pause)

    def pushback(self, retry_after: float | None, epoch: int) -> None:
        if epoch != self.epoch:
            return  # sent before the last change of pace
        now = self.clock()
        i = self._slot(now)
        self._back[i] += 1
        self._all[i] += 1
        back, total = sum(self._back), sum(self._all)
        if back >= HOLD_MIN and back >= HOLD_SHARE * total:
            self._hold(now)
        if back >= STRONG_MIN and back >= STRONG_SHARE * total:
            accepted = self._accepted(now, in_flight=self.window.in_flight)
            if accepted < MIN_RATE and self._unread:
                # Saturated twice with nothing back yet: a slow model behind fast refusals.
                # Then what was sent and not refused is what the server took.
                accepted = (sum(self._sent) - back) / self._span(now)
            self._unread = accepted < MIN_RATE
            pause = min(retry_after if retry_after is not None else 1.0, MAX_PAUSE)
            self.pacer.pause(pause)
            self._held = None  # the trend came: the shrink decides from here
            self.window.shrink()
            self.cuts += 1
            if accepted >= MIN_RATE:
                current = self.pacer.request_rate
                self.limit = min(accepted, current) if current is not None else accepted
                self.pacer.set_request_rate(self.limit * HOLD)
            self._new_epoch(now + pause)
        elif self.limit is not None and back >= MILD_MIN and back >= MILD_SHARE * total:
            current = self.pacer.request_rate
            hold = self.limit * HOLD
            if current is not None and current > hold:
                self.pacer.set_request_rate(hold)
                self.cuts += 1
                self._new_epoch(now)
            elif back >= HOLD_MIN and back >= HOLD_SHARE * total and now - self._epoch_start >= 1.0:
                # More than scattered refusals at the pace the limit allows: the limit was read
                # too high (a first reading can span two of the server's counting windows).
                # What got through over this pace's last second is the limit.
                accepted = self._accepted(now, in_flight=self.window.in_flight)
                if MIN_RATE <= accepted < self.limit:
                    self.limit = accepted
                    self.pacer.set_request_rate(accepted * HOLD)
                    self.cuts += 1
                    self._new_epoch(now)

    def _hold(self, now: float) -> None:
        """Pushback is more than scattered: a trend may be starting. Stop the window's quick
        growth until it shows; if none does within the sliding window, the pushback is
        scattered after all (an aggregator's upstreams), and the quick growth resumes for the
        rest of the epoch, or a few 429s early in a run would leave its window small."""
        window = self.window
        if self._held is None and not self._hold_spent and window.threshold > window.size:
            self._held = (now, window.threshold)
            window.hold()

    def _lapse_hold(self, now: float) -> None:
        if self._held is not None and now - self._held[0] >= HOLD_FOR:
            self._end_hold()
            self._hold_spent = True

    def _end_hold(self) -> None:
        """Quick growth again, from where the hold stopped it."""
        if self._held is not None:
            self.window.threshold = max(self.window.threshold, self._held[1])
            self._held = None

    def _read_latency(self, now: float) -> None:
        window = self.window
        # Only while the window holds requests back is the queue ours to shorten.
        if self.latency.queueing(now) and window.in_flight >= window.size / 2:
            self._held = None  # a cut for a reason of its own: a lapsing hold must not undo it
            before = window.size
            window.shrink(LATENCY_KEEP)
            if window.size < before:
                self.latency_cuts += 1

    def _probe(self, now: float) -> None:
        binding = self.pacer.waits > self._waits
        self._waits = self.pacer.waits
        rate = self.pacer.request_rate
        if self.limit is None or rate is None or not binding or now < self._probe_after:
            return
        if not any(self._back) and now - self._epoch_start >= 1.0:
            # Everything got through: the server accepts at least this much.
            self.limit = max(self.limit, self._accepted(now, in_flight=self.window.in_flight))
        rate *= 1 + STEP
        if self.ceiling is not None:
            rate = min(rate, self.ceiling)
        self.pacer.set_request_rate(rate)

    def headers(self, headers: Mapping[str, str]) -> None:
        """Use the limits a server states (per minute, as OpenAI states them) where the user
        gave none; pause when one is used up, until it resets."""
        if not self.rpm_given:
            per_second = _per_second(headers.get("x-ratelimit-limit-requests"))
            if per_second and per_second != self.ceiling:
                self.ceiling = per_second
                self.pacer.set_request_rate(per_second)
        if not self.tpm_given:
            per_second = _per_second(headers.get("x-ratelimit-limit-tokens"))
            if per_second and per_second != self.pacer.token_rate:
                self.pacer.set_token_rate(per_second)
        for kind in ("requests", "tokens"):
            remaining = headers.get(f"x-ratelimit-remaining-{kind}")
            if remaining is not None and remaining.strip() in ("0", "0.0"):
                reset = parse_reset(headers.get(f"x-ratelimit-reset-{kind}", ""))
                if reset:
                    self.pacer.pause(min(reset, MAX_PAUSE))
