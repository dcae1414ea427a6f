"""Scenarios closer to a real endpoint (issue 9): answers that take seconds, a limit nobody
states, a bucket that says when to come back only in its message, streams that stall. Each
request count is multiplied by `--scale` (a quick look at a tenth of the size, say)."""

from __future__ import annotations

import heapq
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.inputs import input_file
from bench.mock import MockFlags
from bench.report import Check, ScenarioResult
from bench.runs import BARE, Client, ClientRun
from bench.scenarios import STEADY_NOTE, Done, Options, Scenario, _lost_check, _rate_targets, _ratio, _run
from pipeline.mock.server import job_key

SLOW_WALL = 1.15  # pipeline wall / bare loop wall, at most
BUCKET_RPM = 600.0
BUCKET_WALL = 1.1  # wall / the bucket's floor, at most
BUCKET_429 = 0.03
IDLE_TIMEOUT = 10.0
STALL_SLACK = 5.0  # seconds past the idle timeout a stalled run may take


def _scaled(opts: Options, requests: int) -> int:
    return max(1, round(requests * opts.scale))


def _seconds(ms: float) -> str:
    return f"{ms / 1000:g} s" if ms >= 1000 else f"{ms:g} ms"


def _all_succeeded(run: ClientRun) -> Check:
    m = run.measurement
    return Check(
        f"{run.client.name}: every request succeeded",
        f"exit {m.exit_code}, {run.succeeded:,} of {run.requests:,}",
        "exit 0, lost 0",
        m.exit_code == 0 and run.lost == 0,
    )


def _mock_load(run: ClientRun) -> Check:
    share = run.mock_cpu / max(run.measurement.wall, 1e-9)
    return Check(
        f"{run.client.name}: mock CPU, max in flight",
        f"{run.mock_cpu:.2f} s ({share:.0%} of the wall), {run.mock.get('max_in_flight', 0):,}",
    )


# slow: answers that take seconds, no limit ------------------------------------------------


@dataclass(frozen=True)
class SlowCase:
    key: str
    requests: int
    concurrency: int
    flags: MockFlags

    def latency(self) -> str:
        f = self.flags
        if f.latency_max_ms:
            return f"{f.latency_ms / 1000:g}-{f.latency_max_ms / 1000:g} s"
        return _seconds(f.latency_ms)


SLOW = (
    SlowCase("a", 4_000, 500, MockFlags(latency_ms=5000)),
    SlowCase("b", 20_000, 2_000, MockFlags(latency_ms=2000)),
    SlowCase("c", 5_000, 1_000, MockFlags(latency_ms=500, latency_max_ms=20_000)),
)


def _latencies(input: Path, flags: MockFlags) -> Iterator[float]:
    """Each job's latency in seconds, as the mock draws it (pipeline.mock.server.MockServer._latency:
    spread by the job's key when latency_max_ms is set; jitter left out)."""
    low = flags.latency_ms / 1000
    high = (flags.latency_max_ms or 0) / 1000
    with input.open("rb") as lines:
        for line in lines:
            if not line.strip():
                continue
            if high > low > 0:
                share = int(job_key(orjson.loads(line))[8:16], 16) / 2**32
                yield low * math.exp(share * math.log(high / low))
            else:
                yield low


def _floor(input: Path, flags: MockFlags, concurrency: int) -> float:
    """The wall of a client sending in input order with every slot always busy and nothing but
    the mock's latency in the way (requests / concurrency × latency when it is fixed)."""
    slots = [0.0] * concurrency
    for latency in _latencies(input, flags):
        heapq.heapreplace(slots, slots[0] + latency)
    return max(slots)


def slow(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    cases = [(case, _scaled(opts, case.requests)) for case in SLOW]
    title = "no limit; " + "; ".join(
        f"({c.key}) {n:,} requests, mock {c.flags.describe()}, concurrency {c.concurrency:,}"
        for c, n in cases
    )
    runs: list[ClientRun] = []
    checks: list[Check] = []
    floors: list[str] = []
    for case, n in cases:
        input = input_file(opts.out / "inputs", n)
        clients = (
            Client(name=f"{BARE.name} ({case.key}) {case.latency()}", kind="bare"),
            Client(name=f"pipeline ({case.key}) {case.latency()}", kind="pipeline"),
        )
        pair = [_run("slow", opts, c, input, case.flags, concurrency=case.concurrency) for c in clients]
        bare, pipe = pair
        runs += pair
        floor = _floor(input, case.flags, case.concurrency)
        floors.append(f"({case.key}) {floor:.1f} s")
        checks += [
            _ratio(
                f"({case.key}) {n:,} requests, {case.latency()}, concurrency {case.concurrency:,}:"
                " pipeline wall / bare loop wall",
                pipe.measurement.wall,
                bare.measurement.wall,
                SLOW_WALL,
            ),
            _lost_check(pipe),
            _lost_check(bare),
            _mock_load(bare),
            _mock_load(pipe),
        ]
    notes = [
        "each pair on the same input and a fresh mock with the same switches, the bare loop first;"
        " with latency_max_ms each job keeps its own latency (log-uniform, drawn from the job),"
        " so both clients meet the same work",
        "floor, a client sending in input order with every slot always busy and nothing but the"
        " mock's latency in the way: " + ", ".join(floors),
        "the mock is not the bottleneck when its CPU seconds are a small share of the wall and its"
        " max in flight reaches the concurrency (or the request count, when smaller): it holds"
        " every request it gets for the latency, so a client that keeps its slots full shows it",
        "the bare loop: one aiohttp session, a semaphore, each request sent once (the ceiling)",
    ]
    return ScenarioResult("slow", title, runs, checks, notes, load_before=load)


# unstated: a limit nobody states ---------------------------------------------------------


@dataclass(frozen=True)
class RateCase:
    key: str
    requests: int
    rpm: float
    latency_ms: float
    concurrency: int
    least: float  # of the limit, at the steady rate
    most: float  # share of answers that are 429s


UNSTATED = (
    RateCase("a", 3_000, 3_000, 50, 256, 0.95, 0.01),
    RateCase("b", 1_200, 3_000, 50, 256, 0.93, 0.02),
    RateCase("c", 600, 600, 50, 256, 0.93, 0.02),
    RateCase("d", 6_000, 12_000, 50, 256, 0.93, 0.02),
    RateCase("e", 3_000, 3_000, 5000, 1_000, 0.95, 0.01),
)
SCATTERED = MockFlags(latency_ms=50, rate_429=0.02, retry_after=1.0)
SCATTERED_REQUESTS = 10_000
SCATTERED_SLACK = 0.10  # of the wall without 429s, on top of one Retry-After


def unstated(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    runs: list[ClientRun] = []
    checks: list[Check] = []
    limits: dict[str, float] = {}
    described: list[str] = []
    for case in UNSTATED:
        n = _scaled(opts, case.requests)
        flags = MockFlags(latency_ms=case.latency_ms, rpm=case.rpm)
        client = Client(
            name=f"pipeline ({case.key}) {n:,} at {case.rpm:,.0f}/min, {_seconds(case.latency_ms)}",
            kind="pipeline",
        )
        run = _run(
            "unstated", opts, client, input_file(opts.out / "inputs", n), flags, concurrency=case.concurrency
        )
        runs.append(run)
        limits[client.name] = case.rpm / 60
        checks += _rate_targets(run, case.rpm / 60, least=case.least, most=case.most)
        described.append(
            f"({case.key}) {n:,} requests at {case.rpm:,.0f}/min, {_seconds(case.latency_ms)},"
            f" concurrency {case.concurrency:,}"
        )

    # (f) scattered 429s and no limit: what they cost against the same mock without them
    n = _scaled(opts, SCATTERED_REQUESTS)
    input = input_file(opts.out / "inputs", n)
    without = _run(
        "unstated",
        opts,
        Client(name="pipeline (f) no 429s", kind="pipeline"),
        input,
        MockFlags(latency_ms=SCATTERED.latency_ms),
    )
    with_429 = _run(
        "unstated",
        opts,
        Client(name=f"pipeline (f) {SCATTERED.rate_429:.0%} 429s", kind="pipeline"),
        input,
        SCATTERED,
    )
    runs += [without, with_429]
    clean_wall, wall = without.measurement.wall, with_429.measurement.wall
    chain = int(with_429.mock.get("most_refusals_of_a_job", 1)) or 1
    bound = chain * SCATTERED.retry_after + SCATTERED_SLACK * clean_wall
    checks += [
        Check(
            f"(f) {n:,} requests, {SCATTERED.describe()}: wall with 429s - without",
            f"{wall - clean_wall:.2f} s ({wall:.2f} - {clean_wall:.2f} s)",
            f"≤ {bound:.2f} s ({chain} Retry-After{'s' if chain > 1 else ''} of {SCATTERED.retry_after:g} s"
            f" in a row, the most one job met, + {SCATTERED_SLACK:.0%} of {clean_wall:.2f} s)",
            wall - clean_wall <= bound,
        ),
        _lost_check(without),
        _lost_check(with_429),
    ]
    described.append(f"(f) {n:,} requests, {SCATTERED.describe()} / without the 429s, concurrency 256")
    title = "pipeline, no --rpm; " + "; ".join(described)
    notes = [
        "limit: rpm/60 requests a second, counted by the mock per wall-clock second, with no"
        " x-ratelimit headers; pipeline is told nothing and finds it from the 429s",
        STEADY_NOTE,
        "% of limit: each run against its own limit; (f) has none",
        f"(f) target: the Retry-Afters ({SCATTERED.retry_after:g} s each) that the job refused most"
        " often had to wait in a row, which a client that honours them cannot avoid when that job is"
        " one of the last (with some 80 retries in the last second, one refused twice is likely),"
        f" plus {SCATTERED_SLACK:.0%} of the wall without 429s for the retries",
    ]
    return ScenarioResult("unstated", title, runs, checks, notes, load_before=load, run_limits=limits)


# bucket: a minute's quota at once, then a trickle ----------------------------------------


def bucket(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    n = _scaled(opts, 1_500)
    rate = BUCKET_RPM / 60
    floor = max(n - BUCKET_RPM, 0) / rate
    target = BUCKET_WALL * floor
    input = input_file(opts.out / "inputs", n)
    runs: list[ClientRun] = []
    checks: list[Check] = []
    for latency_ms, concurrency, what in ((1000, 256, "a real model"), (50, 64, "the default concurrency")):
        flags = MockFlags(latency_ms=latency_ms, rpm=BUCKET_RPM, limit_style="bucket")
        client = Client(
            name=f"pipeline, {_seconds(latency_ms)}, concurrency {concurrency} ({what})", kind="pipeline"
        )
        run = _run("bucket", opts, client, input, flags, concurrency=concurrency)
        runs.append(run)
        checks += [
            _all_succeeded(run),
            Check(
                f"{client.name}: wall (floor {floor:.3g} s)",
                f"{run.measurement.wall:.1f} s",
                f"≤ {target:.3g} s ({BUCKET_WALL:g} × floor)",
                run.measurement.wall <= target,
            ),
            Check(
                f"{client.name}: 429s",
                f"{run.share_429:.2%} of answers",
                f"≤ {BUCKET_429:.0%}",
                run.share_429 <= BUCKET_429,
            ),
        ]
    title = (
        f"{n:,} requests, pipeline with no --rpm, mock: limit {BUCKET_RPM:g}/min, a bucket"
        " (latency 1 s at concurrency 256, then 50 ms at 64)"
    )
    notes = [
        f"the bucket holds a minute's quota ({BUCKET_RPM:g}) and refills at {rate:g} a second; each 429"
        " says when to come back only in its message ('Please try again in Nms'), no Retry-After",
        f"floor: the first {BUCKET_RPM:g} go at once, the other {max(n - BUCKET_RPM, 0):,.0f} at"
        f" {rate:g} a second: {floor:.3g} s whatever the client (the last answer then takes its"
        " latency more, 1 s in the first run)",
    ]
    return ScenarioResult("bucket", title, runs, checks, notes, load_before=load)


# stall: streams that stop and stay open --------------------------------------------------


def stall(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    n = _scaled(opts, 100)
    flags = MockFlags(latency_ms=200, stall_rate=0.05)
    concurrency = 64
    title = f"{n:,} streamed requests, concurrency {concurrency}, mock: {flags.describe()}"
    input = input_file(opts.out / "inputs", n, stream=True)
    client = Client(
        name=f"pipeline --idle-timeout {IDLE_TIMEOUT:g}",
        kind="pipeline",
        flags=("--idle-timeout", f"{IDLE_TIMEOUT:g}"),
    )
    run = _run("stall", opts, client, input, flags, concurrency=concurrency)
    bound = IDLE_TIMEOUT + STALL_SLACK
    checks = [
        _all_succeeded(run),
        Check(
            f"{client.name}: wall",
            f"{run.measurement.wall:.1f} s",
            f"≤ {bound:g} s (idle timeout + {STALL_SLACK:g} s)",
            run.measurement.wall <= bound,
        ),
        Check("streams stalled (mock)", f"{run.mock.get('statuses', {}).get('stall', 0):,}"),
    ]
    notes = [
        "a stalled stream sends its first chunk, then nothing, the connection kept open; the mock"
        " stalls a job once, so its second try is answered",
        f"the bound is the idle timeout (here {IDLE_TIMEOUT:g} s, default 60 s) plus a few seconds:"
        " no client can tell a stalled stream from a slow one before the timeout",
    ]
    return ScenarioResult("stall", title, runs=[run], checks=checks, notes=notes, load_before=load)


SCENARIOS: dict[str, Scenario] = {
    "slow": slow,
    "unstated": unstated,
    "bucket": bucket,
    "stall": stall,
}
