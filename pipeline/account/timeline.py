"""A run over time: what the books count, by the interval it was counted in.

Every count the books make also goes into the interval of wall-clock time it happened in:
requests started, answers by what they were (the same keys as usage's `answers`: "200",
"429", "503", "timeout", a verdict's code...), tokens in and out, cost, latency and time to
first token (percentiles of the interval), and, sampled as each interval closes, requests in
flight and the pace in force (given, stated by the server, or found): the account's, and each
model's with a pace of its own (`scopes`, by model). So the intervals of a run add up exactly
to what the books counted in it.

Intervals are INTERVAL seconds long (a run of 20 s is drawn in about 20 points); a run that
has kept MAX_POINTS of them merges them in pairs into intervals twice as long, so any run keeps
at most that many (a million-line run costs a few hundred kilobytes, whatever its length). An
interval in which nothing was counted is kept, empty: a stall is drawn as a fall to nothing,
not closed up as though it never was. Each run is a stretch of its own; the
stretches are saved with the usage totals at every checkpoint, so a crash loses neither
more nor less of them than of the totals, and `merge` keeps every shard's stretches,
joined by time in the report.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from pipeline.account.histogram import Histogram

INTERVAL = 1.0  # seconds, to start with (10 s before: a run shorter than that was one dot)
MAX_POINTS = 1000  # intervals a run keeps at most

# What an interval holds, by short keys (a run's stretch is saved at every checkpoint).
SUMS = ("started", "tokens_in", "tokens_out", "cost", "latency_n")
# In flight, the pace in force (requests a second), where it comes from, and the limit it keeps to.
Sample = Callable[[], tuple[int, float | None, str | None, float | None]]
# The same pace, limit and where they come from for each model with a pace of its own.
Paces = Callable[[], dict[str, tuple[float | None, str | None, float | None]]]


def kind(answer: str) -> str:
    """The chart's kind of an answer key: success, 429, 5xx, invalid (a verdict) or error."""
    if answer == "200":
        return "success"
    if answer == "429":
        return "429"
    if len(answer) == 3 and answer.startswith("5") and answer.isdigit():
        return "5xx"
    if answer.startswith("invalid"):
        return "invalid"
    return "error"


def _empty(start: float) -> dict[str, Any]:
    return {"start": start, "answers": {}, **dict.fromkeys(SUMS, 0)}


class Stretch:
    """One run's intervals."""

    def __init__(self, started: float, clock: Callable[[], float] = time.time):
        self.started = started  # wall clock, seconds
        self.clock = clock
        self.length = INTERVAL
        self.points: list[dict[str, Any]] = []
        self._index = -1
        self._open: dict[str, Any] | None = None
        self._latency = Histogram()
        self._ttft = Histogram()
        self.sample: Sample | None = None
        self.paces: Paces | None = None

    def at(self, now: float) -> dict[str, Any]:
        index = int((now - self.started) // self.length)
        if index != self._index or self._open is None:
            self.close()
            if index > self._index + 1:
                index = self._idle(now, index)
            self._index = index
            self._open = _empty(self.started + index * self.length)
            self.points.append(self._open)
            while len(self.points) > MAX_POINTS:
                self._coarsen()
        return self._open

    def _idle(self, now: float, index: int) -> int:
        """The intervals before `index` in which nothing was counted, kept empty (a long stall
        first makes them longer: it adds at most MAX_POINTS / 2); the index `now` is in, then."""
        while index - self._index > MAX_POINTS // 2:
            self._coarsen()
            index = int((now - self.started) // self.length)
        noted = self._noted()
        for k in range(self._index + 1, index):
            self.points.append({**_empty(self.started + k * self.length), "seconds": self.length, **noted})
        return index

    def snapshot(self) -> None:
        """The open interval's percentiles so far, and the time it covers (it stays open)."""
        point = self._open
        if point is None:
            return
        point["seconds"] = round(min(max(self.clock() - point["start"], 0.001), self.length), 3)
        if self._latency.n:
            for q in (50, 90, 99):
                point[f"latency_p{q}"] = self._latency.percentile(q)
        if self._ttft.n:
            point["ttft_p50"] = self._ttft.percentile(50)

    def close(self) -> None:
        """Finish the open interval: its percentiles, and what is in flight at its end."""
        point = self._open
        if point is None:
            return
        self.snapshot()
        point.update(self._noted())
        self._latency, self._ttft = Histogram(), Histogram()
        self._open = None

    def _noted(self) -> dict[str, Any]:
        """What is in flight and the paces in force now, as an interval notes them."""
        point: dict[str, Any] = {}
        if self.sample is not None:
            in_flight, pace, pace_kind, limit = self.sample()
            point["in_flight"] = in_flight
            if pace:
                point["pace"] = pace
                point["pace_kind"] = pace_kind
            if limit:
                point["limit"] = limit
        if self.paces is not None:
            scopes = {
                model: {"pace": pace, "pace_kind": pace_kind, **({"limit": limit} if limit else {})}
                for model, (pace, pace_kind, limit) in self.paces().items()
                if pace
            }
            if scopes:
                point["scopes"] = scopes
        return point

    def _coarsen(self) -> None:
        """Twice as long intervals, merged in pairs (the percentiles by their counts)."""
        self.length *= 2
        merged: list[dict[str, Any]] = []
        for point in self.points:
            start = self.started + (point["start"] - self.started) // self.length * self.length
            if merged and merged[-1]["start"] == start:
                _add(merged[-1], point)
            else:
                merged.append({**point, "start": start, "answers": dict(point["answers"])})
        self.points = merged
        if self._open is not None:  # the open interval is the last, merged or not
            self._open = merged[-1]
        self._index = int((merged[-1]["start"] - self.started) // self.length) if merged else -1

    def state(self) -> dict[str, Any]:
        return {"started": self.started, "interval": self.length, "points": self.points}


def _add(into: dict[str, Any], point: dict[str, Any]) -> None:
    n1, n2 = into.get("latency_n", 0), point.get("latency_n", 0)
    for key in ("latency_p50", "latency_p90", "latency_p99", "ttft_p50"):
        if key in point:
            mine = into.get(key)
            into[key] = point[key] if mine is None else (mine * n1 + point[key] * n2) / max(n1 + n2, 1)
    for key in (*SUMS, "seconds"):
        into[key] = into.get(key, 0) + point.get(key, 0)
    for answer, n in point["answers"].items():
        into["answers"][answer] = into["answers"].get(answer, 0) + n
    for key in ("in_flight", "pace", "pace_kind", "limit", "scopes"):
        if key in point:
            into[key] = point[key]  # the later sample


class Timeline:
    """Every run's stretch; the last is this run's, counted into."""

    def __init__(self, stretches: list[dict[str, Any]] | None = None) -> None:
        self.earlier: list[dict[str, Any]] = stretches or []  # saved states, as they were
        self.run: Stretch | None = None
        self.clock: Callable[[], float] = time.time
        self.ended = False  # this run's stretch finished: it gains no interval after

    def begin(self) -> None:
        """This run's stretch starts now."""
        self.run = Stretch(self.clock(), self.clock)
        self.ended = False

    def sample(self, sample: Sample, paces: Paces | None = None) -> None:
        """Where in flight and the paces in force are read, as each interval closes."""
        if self.run is not None:
            self.run.sample, self.run.paces = sample, paces

    def finish(self) -> None:
        """The run ends: its last interval is closed (in flight and the pace noted)."""
        if self.run is not None:
            self.run.close()
            self.ended = True

    def _point(self) -> dict[str, Any] | None:
        return None if self.run is None else self.run.at(self.clock())

    # -- what the books count ------------------------------------------------------------------

    def started(self) -> None:
        run = self.run
        if run is not None:
            # (`at`'s look at the open interval written out: every attempt comes here)
            now = self.clock()
            point = run._open
            if point is None or int((now - run.started) // run.length) != run._index:
                point = run.at(now)
            point["started"] += 1

    def answer(self, answer: str, attempts: int = 1) -> None:
        point = self._point()
        if point is not None:
            point["answers"][answer] = point["answers"].get(answer, 0) + attempts

    def spent(self, tokens_in: int, tokens_out: int, cost: float | None) -> None:
        point = self._point()
        if point is not None:
            point["tokens_in"] += tokens_in
            point["tokens_out"] += tokens_out
            if cost:
                point["cost"] += cost

    def kept(
        self, tokens_in: int, tokens_out: int, costs: list[float], latencies: list[int], firsts: list[int]
    ) -> None:
        """Results written at one moment: the tokens they used, what each cost (where known,
        as `spent` counts it), and the buckets of their latencies and times to first token
        (`histogram.bucket`), for the interval's percentiles."""
        point = self._point()
        if point is None or self.run is None:
            return
        spent = point["cost"]  # (added in the same order as one by one: the same float)
        for cost in costs:
            spent += cost
        point["tokens_in"] += tokens_in
        point["tokens_out"] += tokens_out
        point["cost"] = spent
        point["latency_n"] += len(latencies)
        self.run._latency.count(latencies)
        self.run._ttft.count(firsts)

    def recent(self, answer: str, seconds: float) -> int:
        """Answers `answer` in this run's intervals of about the last `seconds`."""
        if self.run is None:
            return 0
        since = self.clock() - seconds
        n = 0
        for point in reversed(self.run.points):
            if point["start"] + self.run.length <= since:
                break
            n += point["answers"].get(answer, 0)
        return n

    # -- saved and read ------------------------------------------------------------------------

    def state(self) -> list[dict[str, Any]]:
        """Every stretch as saved. A run still going has its intervals filled up to now (at a
        checkpoint, not at each request), so that a stall in progress is saved, and drawn, as
        the fall to nothing it is; a finished run's end is where it ended."""
        if self.run is None:
            return list(self.earlier)
        if not self.ended:
            self.run.at(self.clock())
        self.run.snapshot()  # the open interval's figures so far
        return [*self.earlier, self.run.state()]

    def add(self, stretches: Iterable[dict[str, Any]], label: str) -> None:
        """Another folder's stretches (a shard's), labelled."""
        self.earlier += [{**stretch, "shard": label} for stretch in stretches]


def _binned(points: list[dict[str, Any]], length: float) -> dict[float, dict[str, Any]]:
    """One stretch's points in intervals of `length` (its own, or longer): added up, the
    later sample kept."""
    out: dict[float, dict[str, Any]] = {}
    for point in points:
        start = point["start"] // length * length
        into = out.get(start)
        if into is None:
            out[start] = {**point, "start": start, "answers": dict(point["answers"])}
        else:
            _add(into, point)
    return out


def joined(stretches: list[dict[str, Any]]) -> tuple[float, list[dict[str, Any]]]:
    """Every stretch's intervals on one time axis (the longest interval of any), summed where
    stretches meet (shards running at once: their requests in flight added, the account's
    pace and limit the higher, the time covered the longer): the interval length and the
    points, by start."""
    length = max((float(s.get("interval", INTERVAL)) for s in stretches), default=INTERVAL)
    by_start: dict[float, dict[str, Any]] = {}
    for stretch in stretches:
        for start, point in _binned(stretch.get("points", []), length).items():
            into = by_start.get(start)
            if into is None:
                by_start[start] = point
                continue
            flying = into.get("in_flight", 0) + point.get("in_flight", 0)
            seconds = max(into.get("seconds", 0), point.get("seconds", 0))
            pace = max(into.get("pace") or 0.0, point.get("pace") or 0.0)
            limit = max(into.get("limit") or 0.0, point.get("limit") or 0.0)
            _add(into, point)
            into["in_flight"], into["seconds"] = flying, seconds
            if pace:
                into["pace"] = pace
            if limit:
                into["limit"] = limit
    return length, [by_start[s] for s in sorted(by_start)]
