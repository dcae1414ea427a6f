"""Shards sharing one limit through Redis (issue 12): 4 and 16 `pipeline run --shard K/N`
processes at once against a mock enforcing 3,000 requests a minute, with the limit given
(`--rpm 3000`) and found together; then `pipeline merge`. Judged on the mock's own count."""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson

from bench.inputs import input_file, input_ids
from bench.mock import PIPELINE, MockFlags, running_mock
from bench.report import Check, ScenarioResult
from bench.runs import ROOT
from bench.scenarios import Done, Options

RPM = 3000.0
LATENCY_MS = 50.0
CASES = (  # shards, requests, rpm given, (least share of the limit, most 429s)
    (4, 3000, True, (0.95, 0.005)),
    (4, 3000, False, (0.90, 0.02)),
    (16, 1200, True, (0.95, 0.005)),
    (16, 1200, False, (0.90, 0.02)),
)


@contextmanager
def _redis(folder: Path) -> Iterator[str]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError(
            "the shards scenario needs redis-server: make test installs it (apt-get install redis-server)"
        )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder.mkdir(parents=True, exist_ok=True)
    args = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(folder),
    ]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()


def _steady(stats: dict[str, Any]) -> float:
    per_second = {int(k): v for k, v in stats.get("accepted_per_second", {}).items()}
    if len(per_second) < 3:
        return 0.0
    first, last = min(per_second) + 1, max(per_second) - 1
    return float(statistics.mean(per_second.get(s, 0) for s in range(first, last + 1)))


def _case(opts: Options, shards: int, requests: int, given: bool) -> dict[str, Any]:
    name = f"{shards} shards, " + (f"--rpm {RPM:g}" if given else "no --rpm")
    print(f"[bench] shards: {name} on {requests:,} requests ...", file=sys.stderr, flush=True)
    input = input_file(opts.out / "inputs", requests)
    folder = opts.out / "runs" / "shards" / f"{shards}-{'given' if given else 'found'}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with (
        _redis(folder / "redis") as store,
        running_mock(MockFlags(latency_ms=LATENCY_MS, rpm=RPM), log=folder / "mock.log") as mock,
    ):
        started = time.monotonic()
        procs = []
        for k in range(1, shards + 1):
            cmd = [
                PIPELINE,
                "run",
                "--input",
                str(input),
                "--output",
                str(folder / "out"),
                "--base-url",
                mock.url,
            ]
            cmd += [
                "--shard",
                f"{k}/{shards}",
                "--shared-limit",
                store,
                "--concurrency",
                str(opts.concurrency),
                "--quiet",
            ]
            cmd += ["--rpm", f"{RPM:g}"] if given else []
            log = (folder / f"shard-{k}.log").open("wb")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
        codes = [p.wait() for p in procs]
        wall = time.monotonic() - started
        stats = mock.stats()
    merged = subprocess.run(
        [PIPELINE, "merge", str(folder / "out")], capture_output=True, text=True, cwd=ROOT
    )
    got = set()
    results = folder / "out" / "results.jsonl"
    if results.exists():
        for line in results.read_bytes().splitlines():
            got.add(orjson.loads(line)["custom_id"])
    wanted = set(input_ids(input))
    statuses: dict[str, int] = stats.get("statuses", {})
    print(
        f"[bench]   exits {sorted(set(codes))}, {wall:.1f} s, {len(got):,} merged",
        file=sys.stderr,
        flush=True,
    )
    return {
        "name": name,
        "codes": codes,
        "wall": wall,
        "steady": _steady(stats),
        "share_429": statuses.get("429", 0) / max(sum(statuses.values()), 1),
        "lost": len(wanted - got),
        "merge": merged.returncode,
    }


def shards(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    limit = RPM / 60
    checks: list[Check] = []
    for count, requests, given, (least, most) in CASES:
        n = max(1, round(requests * opts.scale))
        case = _case(opts, count, n, given)
        label = f"{case['name']}, {n:,} requests"
        checks += [
            Check(
                f"{label}: steady rate, all together",
                f"{case['steady'] / limit:.1%} of the limit",
                f"≥ {least:.0%}",
                case["steady"] >= least * limit,
            ),
            Check(
                f"{label}: 429s",
                f"{case['share_429']:.2%} of answers",
                f"≤ {most:.1%}",
                case["share_429"] <= most,
            ),
            Check(
                f"{label}: every shard exited 0, merged, none lost",
                f"exits {sorted(set(case['codes']))}, merge {case['merge']}, lost {case['lost']:,}",
                "0, 0, 0",
                set(case["codes"]) == {0} and case["merge"] == 0 and case["lost"] == 0,
            ),
            Check(f"{label}: wall", f"{case['wall']:.1f} s (floor {n / limit:.1f} s)"),
        ]
    title = (
        f"pipeline run --shard K/N --shared-limit (a local redis-server), all at once; mock: latency "
        f"{LATENCY_MS:g} ms, limit {RPM:g}/min counted per wall-clock second; concurrency {opts.concurrency} each"
    )
    notes = [
        "steady rate: the mock's accepted requests a second over the whole seconds of the run, first and last left out, all shards together",
        "without the shared limit, four processes given --rpm 3000 each sent four times the limit (issue 12)",
    ]
    return ScenarioResult(
        "shards", title, runs=[], checks=checks, notes=notes, limit_per_second=limit, load_before=load
    )


SCENARIOS = {"shards": shards}
