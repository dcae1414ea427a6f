"""One job three ways (issue 14, point 4): one `pipeline run` process, four local
`pipeline run --shard K/4 --shared-limit` processes then `pipeline merge`, and `pipeline ray
--shards 4` on a local Ray cluster the command starts itself; plus Ray finding the limit
(no --rpm). Each against a fresh mock enforcing 3,000 requests a minute; judged on the mock's
own count, the merged results, and the CPU every process of the way used.

CPU is that of every process a way starts, counted by `bench.reap`."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psutil

from bench.inputs import input_file, input_ids
from bench.mock import PIPELINE, MockFlags, running_mock
from bench.reap import Cost, reaped
from bench.report import Check, ScenarioResult
from bench.scenarios import Done, Options
from bench.shards import _redis, _steady

RPM = 3000.0
LATENCY_MS = 50.0
REQUESTS = 3000
SHARDS = 4
FAKE_KEY = "bench-fake-key"  # the mock asks for none; pipeline reads LUMENFALL_API_KEY


@dataclass(frozen=True)
class Way:
    key: str
    name: str
    ray: bool
    shards: int  # 1: a single `pipeline run`
    given: bool  # --rpm 3000 given
    least: float  # least steady share of the limit
    most: float  # most 429s, as a share of answers
    latency_ms: float = LATENCY_MS  # answers take this long...
    jitter_ms: float = 0.0  # ...and up to this much more
    requests: float = 1.0  # of the scenario's requests


WAYS = (
    Way("a", "one process, --rpm 3000", ray=False, shards=1, given=True, least=0.95, most=0.005),
    Way(
        "b",
        "4 local shards + redis, --rpm 3000",
        ray=False,
        shards=SHARDS,
        given=True,
        least=0.95,
        most=0.005,
    ),
    Way("c", "ray --shards 4, --rpm 3000", ray=True, shards=SHARDS, given=True, least=0.95, most=0.005),
    Way("d", "ray --shards 4, no --rpm", ray=True, shards=SHARDS, given=False, least=0.90, most=0.02),
    # Real models answer in seconds: a pace kept with hundreds of requests in flight.
    Way(
        "e",
        "ray --shards 4, no --rpm, answers in 2 to 10 s",
        ray=True,
        shards=SHARDS,
        given=False,
        least=0.90,
        most=0.02,
        latency_ms=2000.0,
        jitter_ms=8000.0,
        requests=0.5,
    ),
)


def _env(**more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["LUMENFALL_API_KEY"] = FAKE_KEY
    return env | more


@dataclass
class Outcome:
    way: Way
    requests: int
    wall: float = 0.0
    cpu: float = 0.0
    redis_cpu: float = 0.0  # (b): the redis-server holding the shared limit, counted in cpu
    unreaped: float = 0.0  # Ray: its workers' CPU, sampled (the kernel reaped them), counted in cpu
    codes: list[int] = field(default_factory=list)
    merge: int | None = None  # (b) only: the separate `pipeline merge`
    steady: float = 0.0
    share_429: float = 0.0
    lost: int = 0
    first_request: float | None = None  # seconds from the start to the mock's first accepted second
    linger: float = 0.0
    leftovers: int = 0

    @property
    def ok_exits(self) -> bool:
        return set(self.codes) == {0} and self.merge in (None, 0) and self.lost == 0


def _redis_cpu() -> float:
    """The CPU so far of the redis-server this process started (bench.shards._redis)."""
    total = 0.0
    for child in psutil.Process().children():
        try:
            if child.name() == "redis-server":
                times = child.cpu_times()
                total += times.user + times.system
        except psutil.Error:
            pass
    return total


def _command(way: Way, input: Path, out: Path, url: str, concurrency: int) -> list[str]:
    cmd = [PIPELINE, "ray" if way.ray else "run", "--input", str(input), "--output", str(out)]
    cmd += ["--base-url", url, "--concurrency", str(concurrency), "--quiet"]
    cmd += ["--rpm", f"{RPM:g}"] if way.given else []
    return cmd + (["--shards", str(way.shards)] if way.ray else [])


def _run(opts: Options, way: Way, requests: int) -> Outcome:
    print(
        f"[bench] cluster: ({way.key}) {way.name} on {requests:,} requests ...", file=sys.stderr, flush=True
    )
    input = input_file(opts.out / "inputs", requests)
    folder = opts.out / "runs" / "cluster" / way.key
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out = folder / "out"
    got = Outcome(way, requests)
    costs: list[Cost] = []
    ray_tmp = tempfile.mkdtemp(prefix="rb", dir="/tmp") if way.ray else None
    env = _env(RAY_TMPDIR=ray_tmp) if ray_tmp else _env()
    try:
        flags = MockFlags(latency_ms=way.latency_ms, jitter_ms=way.jitter_ms, rpm=RPM)
        with running_mock(flags, log=folder / "mock.log") as mock:
            base = _command(way, input, out, mock.url, opts.concurrency)
            if way.ray or way.shards == 1:
                costs.append(
                    reaped(base, report=folder / "cost.json", log=folder / "run.log", env=env).cost()
                )
                got.codes = [costs[0].exit]
                got.wall = costs[0].wall
                stats = mock.stats()
            else:
                with _redis(folder / "redis") as store:
                    redis_before = _redis_cpu()
                    shards = [
                        reaped(
                            [*base, "--shard", f"{k}/{way.shards}", "--shared-limit", store],
                            report=folder / f"cost-{k}.json",
                            log=folder / f"shard-{k}.log",
                            env=env,
                        )
                        for k in range(1, way.shards + 1)
                    ]
                    costs += [s.cost() for s in shards]
                    got.codes = [c.exit for c in costs]
                    stats = mock.stats()
                    merge = reaped(
                        [PIPELINE, "merge", str(out)],
                        report=folder / "cost-merge.json",
                        log=folder / "merge.log",
                        env=env,
                    ).cost()
                    got.wall = max(c.end for c in costs) - min(c.start for c in costs) + merge.wall
                    costs.append(merge)
                    got.merge = merge.exit
                    got.redis_cpu = _redis_cpu() - redis_before
    finally:
        if ray_tmp:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    got.cpu = sum(c.cpu for c in costs) + got.redis_cpu
    got.unreaped = sum(c.unreaped for c in costs)
    got.linger = max(c.linger for c in costs)
    got.leftovers = sum(c.leftovers for c in costs)
    got.steady = _steady(stats)
    statuses: dict[str, int] = stats.get("statuses", {})
    got.share_429 = statuses.get("429", 0) / max(sum(statuses.values()), 1)
    seconds = [int(s) for s in stats.get("accepted_per_second", {})]
    epoch = min(c.start for c in costs)
    got.first_request = max(min(seconds) - epoch, 0.0) if seconds else None
    answered = set()
    results = out / "results.jsonl"
    if results.exists():
        for line in results.read_bytes().splitlines():
            answered.add(orjson.loads(line)["custom_id"])
    got.lost = len(input_ids(input) - answered)
    print(
        f"[bench]   exits {sorted(set(got.codes))}, merge {got.merge}, {got.wall:.1f} s, "
        f"CPU {got.cpu:.1f} s, {len(answered):,} results",
        file=sys.stderr,
        flush=True,
    )
    return got


def _table(rows: list[Outcome], limit: float) -> list[str]:
    header = [
        "way",
        "wall s",
        "CPU s",
        "CPU ms/req",
        "1st req s",
        "steady %",
        "429s",
        "exits",
        "merge",
        "lost",
    ]
    cells = [header] + [
        [
            f"({o.way.key}) {o.way.name}",
            f"{o.wall:.1f}",
            f"{o.cpu:.1f}",
            f"{1000 * o.cpu / o.requests:.2f}",
            "-" if o.first_request is None else f"~{o.first_request:.0f}",
            f"{o.steady / limit:.1%}",
            f"{o.share_429:.2%}",
            ",".join(str(c) for c in sorted(set(o.codes))),
            "-" if o.merge is None else str(o.merge),
            f"{o.lost:,}",
        ]
        for o in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = []
    for n, row in enumerate(cells):
        lines.append(
            "  ".join(
                [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            )
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return lines


def cluster(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    limit = RPM / 60
    n = max(1, round(REQUESTS * opts.scale))
    rows = [_run(opts, way, max(1, round(n * way.requests))) for way in WAYS]
    checks: list[Check] = []
    for o in rows:
        label = f"({o.way.key}) {o.way.name}"
        checks += [
            Check(
                f"{label}: steady rate",
                f"{o.steady / limit:.1%} of the limit",
                f"≥ {o.way.least:.0%}",
                o.steady >= o.way.least * limit,
            ),
            Check(
                f"{label}: 429s",
                f"{o.share_429:.2%} of answers",
                f"≤ {o.way.most:.1%}",
                o.share_429 <= o.way.most,
            ),
            Check(
                f"{label}: every exit 0, merged, none lost",
                f"exits {sorted(set(o.codes))}"
                + ("" if o.merge is None else f", merge {o.merge}")
                + f", lost {o.lost:,}",
                "0, 0, 0" if o.merge is not None else "0, 0",
                o.ok_exits,
            ),
            Check(
                f"{label}: wall, CPU",
                f"{o.wall:.1f} s (floor {o.requests / limit:.1f} s), CPU {o.cpu:.1f} s = "
                f"{1000 * o.cpu / o.requests:.2f} ms a request"
                + (f" (redis-server {o.redis_cpu:.2f} s of it)" if o.redis_cpu else "")
                + (f" (kernel-reaped Ray workers {o.unreaped:.1f} s of it)" if o.unreaped else "")
                + (f"; its processes ran on {o.linger:.1f} s after it exited" if o.linger >= 0.5 else "")
                + (f"; {o.leftovers} left running, killed" if o.leftovers else ""),
            ),
        ]
    title = (
        f"one job ({n:,} requests) three ways: pipeline run; {SHARDS} × pipeline run --shard K/{SHARDS} "
        f"--shared-limit + merge; pipeline ray --shards {SHARDS} (a local cluster it starts); mock: latency "
        f"{LATENCY_MS:g} ms ((e): 2 to 10 s, half the requests), limit {RPM:g}/min counted per wall-clock second; concurrency {opts.concurrency} "
        f"per process/shard; {os.cpu_count()} CPUs"
    )
    notes = [
        *_table(rows, limit),
        "wall: from starting the command(s) until the last exited; for (b) the shards and then "
        "`pipeline merge`; (c) and (d) merge inside the command",
        "CPU: user + sys of every process the way started, children included: each command ran "
        "under a reaper made child subreaper (prctl), whose getrusage(RUSAGE_CHILDREN) counts the "
        "whole tree, orphans too (os.wait4 on the command alone would miss what outlives it), plus, "
        "sampled with psutil every 0.1 s, the children the kernel reaps for a parent ignoring "
        "SIGCHLD (Ray's raylet: its workers and actors); for Ray that is the driver and the local "
        "cluster it started (GCS, raylet, workers running the shards, the pace actor, the "
        "coordinator, Ray's agents); for (b) the four shards, the merge and the redis-server over "
        "the run (psutil); the mock's CPU is never counted",
        "1st req s: from the start to the first wall-clock second the mock accepted a request "
        "(whole seconds, so ±1 s): for Ray mostly the cluster starting",
        "steady %: the mock's accepted requests a second over the whole seconds of the run, first "
        "and last left out, all processes together",
    ]
    return ScenarioResult(
        "cluster", title, runs=[], checks=checks, notes=notes, limit_per_second=limit, load_before=load
    )


SCENARIOS = {"cluster": cluster}
