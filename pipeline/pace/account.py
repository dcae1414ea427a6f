"""The account's shared pace held by a process (the Ray actor of `pipeline.pace.actor`).

The same state and rules as the Redis script of `pipeline.pace.store`, in Python: one call
leases starts and tokens, publishes a rate found and a pause, and adds to the account's send
log; `read` counts what the account sent, and the server admitted, over a span. The process holding it answers one
call at a time (an actor's calls are serial), which is what makes each call atomic, as a
script is in Redis. Its clock is its own `time.time()`, the one clock every caller shares.
State unused for KEY_TTL is forgotten, as Redis keys expire.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from pipeline.pace.store import GROW, KEY_TTL, LOG_TTL, SHARE, SIT, Ask, Logged, Reply

_Log = dict[int, dict[str, int]]  # second -> "s1234" / "r1234" / "w1234" / "a1234" -> count (or room)


class AccountPace:
    def __init__(
        self, *, boot_rate: float, watch: float, run: int, clock: Callable[[], float] = time.time
    ) -> None:
        self.boot_rate = boot_rate
        self.watch = watch  # seconds of the send log watched for a run of refusals...
        self.run = run  # ...of at least so many, and half of what was sent: the server is full
        self.clock = clock
        self._reset()
        self._used = 0.0

    def _reset(self) -> None:
        self.fields: dict[str, float] = {}
        self.found_by: str | None = None
        self.members: dict[str, tuple[float, float]] = {}  # pid: its last call, and told up to then
        self.log: _Log = {}

    def call(self, ask: Ask) -> Reply:
        a, want, now = ask, ask.want, self.clock()
        if now - self._used > KEY_TTL:
            self._reset()
        self._used = now
        f = self.fields
        cs_now = math.floor(now * 100)
        boot_at = f.get("boot_at", now)
        full_at, full_resume = f.get("full_at", -1.0), f.get("full_resume", -1.0)
        since = max(cs_now - math.floor(self.watch * 100), math.ceil(full_resume * 100))
        told_refusal, told_new = self._add(a.log, now, since)  # (a run is looked for from `since`)
        if told_refusal:
            if now - f.get("refused_at", 0.0) >= SIT:
                f["refusing"] = now  # refusals told since then, never SIT apart
            f["refused_at"] = now
        if a.found is not None:
            if a.given <= 0 and a.given_tokens <= 0 and f.get("found", 0.0) <= 0:
                f["clock"] = now  # the ramp's leases end with it: the clock they booked goes from now
            f["found"], self.found_by = a.found, a.pid
        leads = (self.found_by or a.pid) == a.pid
        rate, booting = a.given, False
        paused = f.get("paused", 0.0)
        if a.pause_for > 0 and now + a.pause_for > paused:
            paused = f["paused"] = now + a.pause_for
        if a.given <= 0 and told_new:
            run = self._full_run(cs_now, since)
            if run is not None:
                first, told, got, admitted = run
                full_at, full_resume = first / 100, told / 100 if told else now
                f["full_at"], f["full_resume"] = full_at, full_resume
                if max(full_resume, now) > paused:
                    paused = f["paused"] = max(full_resume, now)
                if a.given_tokens <= 0 and f.get("found", 0.0) <= 0:
                    # The ramp goes on from what got through in the second before (as told), not its rate.
                    f["boot"] = max(self.boot_rate / 4, min(f.get("boot", self.boot_rate), got))
                    f["refusing"], f["boot_got"] = now, float(admitted)  # else held, as the script says
        if rate <= 0:
            rate = f.get("found", 0.0)
        if rate <= 0 and a.given <= 0 and a.given_tokens <= 0:
            # The ramp of the Redis script: growing by GROW every quarter second, from now, while the account's
            # requests are let through at 3/4 of its rate at least and nothing was refused for
            # a second (or for SIT seconds without a run), not within a second of a pause (two after a run);
            # no start leased till a second after a pause, unless a run set it to what was told admitted.
            booting = True
            rate = f.get("boot", self.boot_rate)
            ok = f.get("boot_ok", 0.0) + a.answered
            if now - boot_at >= 0.25:
                quiet = now - f.get("refused_at", 0.0) >= 1 or now - f.get("refusing", 0.0) >= SIT
                settled = paused + 1 + f.get("boot_got", 0.0) < now  # two seconds after a run's pause
                if settled and quiet and ok >= rate * (now - boot_at) * 0.75:
                    rate, f["clock"] = min(math.floor(rate * GROW + 0.5), 100_000.0), now
                boot_at, ok = now, 0.0
            f["boot"], f["boot_at"], f["boot_ok"] = rate, boot_at, ok
            if now < paused + (not f.get("boot_got")):
                want = 0
        start, token_start = -1.0, -1.0
        want = want if rate > 0 else 0
        tokens = a.want_tokens if a.given_tokens > 0 else 0.0
        # Starts and tokens asked together are leased from one instant, the later clock's.
        base = max(
            now, paused, f.get("clock", 0.0) if want else 0.0, f.get("token_clock", 0.0) if tokens else 0.0
        )
        if want > 0:
            want = min(want, max(1, math.ceil(rate * 0.1)))
            start = base
            f["clock"] = start + want / rate
        if tokens > 0:
            token_start = base
            f["token_clock"] = token_start + tokens / a.given_tokens
        # Processes seen lately, and the time up to which each has told its log and had its answers.
        upto = now if a.holds or want > 0 else now + 3600
        self.members[a.pid] = (now, min(upto, a.whole) if a.whole >= 0 else upto)
        seen, reported, gone = 0, now + 3600, True  # any process leads once it has not been seen for 5 s
        for member, (at, upto) in list(self.members.items()):
            if now - at < 5:
                seen, reported = seen + 1, min(reported, upto)
                gone = gone and member != self.found_by  # whose reading is in force: seen, it leads
            elif now - at > 60:
                del self.members[member]
        leads = leads or gone
        return Reply(
            now, rate, start, token_start, paused, seen, leads, booting, full_at, full_resume, want, reported
        )

    def read(self, since: float, until: float) -> Logged:
        """The account's log from `since` to `until`, as the Redis script reads it."""
        if self.clock() - self._used > KEY_TTL:
            self._reset()
        n = self._logged(int(since * 100), int(until * 100) - 1)
        return Logged(*(sum(n[kind].values()) for kind in "sra"))

    def _add(self, log: str, now: float, since: int) -> tuple[bool, bool]:
        """Adds `log` to the send log; returns whether it told of a refusal, and of one of a
        request sent from hundredth `since` on."""
        parts = log.split()
        told_refusal = told_new = False
        for i in range(0, len(parts) - 4, 5):
            cs, sent, refused, room, admitted = (int(x) for x in parts[i : i + 5])
            counts = self.log.setdefault(cs // 100, {})
            if sent:
                counts[f"s{cs}"] = counts.get(f"s{cs}", 0) + sent
            if admitted:
                counts[f"a{cs}"] = counts.get(f"a{cs}", 0) + admitted
            if refused:
                counts[f"r{cs}"] = counts.get(f"r{cs}", 0) + refused
                told_refusal, told_new = True, told_new or cs >= since
            if room:
                counts[f"w{cs}"] = min(counts.get(f"w{cs}", room), room)
        oldest = int(now) - LOG_TTL
        for second in [s for s in self.log if s < oldest]:
            del self.log[second]
        return told_refusal, told_new

    def _logged(self, since: int, until: int) -> dict[str, dict[int, int]]:
        """Sent, refused, room and admitted ("s", "r", "w", "a") by hundredth, from hundredth
        `since` to `until`, both in."""
        kinds: dict[str, dict[int, int]] = {"s": {}, "r": {}, "w": {}, "a": {}}
        for second in range(since // 100, until // 100 + 1):
            for name, n in self.log.get(second, {}).items():
                cs = int(name[1:])
                if since <= cs <= until:
                    kinds[name[0]][cs] = n
        return kinds

    def _full_run(self, cs_now: int, since: int) -> tuple[int, int | None, int, bool] | None:
        """The latest run of refusals from hundredth `since` on, as the Redis script finds it:
        back from the latest hundredth refused, the earliest one from which on at least `run`
        requests were refused and half of what was sent; else, refusals for a second or more,
        twice `run` and a SHARE of what was sent since the first: full at the latest. With the
        earliest room its refusals told, and what got through in the second before: admitted
        as told so far, or if none is, sent before the first refused and not refused; and which."""
        n = self._logged(since, cs_now // 100 * 100 + 99)
        sent, refused, room = n["s"], n["r"], n["w"]
        n_sent = n_refused = 0
        low: int | None = None
        found: tuple[int, int | None, int, bool] | None = None
        latest, share = -1, (0, 0, 0)  # the latest refused; the earliest, sent and refused from it
        for cs in sorted(sent.keys() | refused.keys(), reverse=True):
            if n_refused or cs in refused:  # from the latest refused on: what follows is in flight
                n_sent += sent.get(cs, 0)
                n_refused += refused.get(cs, 0)
            if cs in room and (low is None or room[cs] < low):
                low = room[cs]
            if cs in refused:
                latest, share = max(latest, cs), (cs, n_sent, n_refused)
                if n_refused >= self.run and n_refused * 2 >= n_sent:
                    found = cs, low, 0, False
        first, n_sent, n_refused = share
        if (
            found is None
            and latest - first >= 100
            and n_refused >= 2 * self.run
            and n_refused * SHARE >= n_sent
        ):
            found = latest, room.get(latest), 0, False
        if found is not None:  # what got through in the second before, as the first reading counts it
            first, low, _, _ = found
            last = low if low is not None and first < low < first + 100 else first
            end = last if last > first else first + 1
            got = sum(k for cs, k in n["a"].items() if last - 100 <= cs < end)
            sent_got = got or sum(sent.get(cs, 0) - refused.get(cs, 0) for cs in range(last - 100, first))
            found = first, low, sent_got, got > 0
        return found
