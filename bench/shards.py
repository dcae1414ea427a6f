"""Shards sharing one limit through Redis (issue 12): 4 and 16 `pipeline run --shard K/N`
processes at once against a mock enforcing 3,000 requests a minute, with the limit given
(`--rpm 3000`) and found together; 4 given `--tpm` against one counting each request's prompt
and max_tokens on arrival (issue 20); then `pipeline merge`. Judged on the mock's own count."""

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

from bench.inputs import input_file, input_ids, mean_token_cost
from bench.mock import PIPELINE, MockFlags, running_mock
from bench.report import Check, ScenarioResult
from bench.runs import ROOT
from bench.scenarios import Done, Options

RPM = 3000.0
TPM = 300_000.0  # counted as OpenAI documents it: each request's prompt and max_tokens, on arrival
LATENCY_MS = 50.0
# shards, requests, the limit ("rpm": --rpm given; "found": none given; "tpm": --tpm given, the
# mock limiting tokens alone), (least share of the limit, most 429s)
CASES = (
    (4, 3000, "rpm", (0.95, 0.005)),
    (4, 3000, "found", (0.90, 0.02)),
    (16, 1200, "rpm", (0.95, 0.005)),
    (16, 1200, "found", (0.90, 0.02)),
    (4, 3000, "tpm", (0.95, 0.005)),
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


def _case(opts: Options, shards: int, requests: int, limit: str) -> dict[str, Any]:
    given = {"rpm": f"--rpm {RPM:g}", "found": "no --rpm", "tpm": f"--tpm {TPM:g} (counted on arrival)"}
    name = f"{shards} shards, {given[limit]}"
    print(f"[bench] shards: {name} on {requests:,} requests ...", file=sys.stderr, flush=True)
    input = input_file(opts.out / "inputs", requests)
    folder = opts.out / "runs" / "shards" / f"{shards}-{limit}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if limit == "tpm":
        flags = MockFlags(latency_ms=LATENCY_MS, tpm=TPM, tpm_count="arrival")
        per_second = TPM / 60 / mean_token_cost(input, count_as="arrival")  # requests a second
    else:
        flags, per_second = MockFlags(latency_ms=LATENCY_MS, rpm=RPM), RPM / 60
    with _redis(folder / "redis") as store, running_mock(flags, log=folder / "mock.log") as mock:
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
            cmd += {"rpm": ["--rpm", f"{RPM:g}"], "tpm": ["--tpm", f"{TPM:g}"]}.get(limit, [])
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
        "limit": per_second,
        "codes": codes,
        "wall": wall,
        "steady": _steady(stats),
        "share_429": statuses.get("429", 0) / max(sum(statuses.values()), 1),
        "lost": len(wanted - got),
        "merge": merged.returncode,
    }


def shards(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    checks: list[Check] = []
    for count, requests, kind, (least, most) in CASES:
        n = max(1, round(requests * opts.scale))
        case = _case(opts, count, n, kind)
        limit = case["limit"]
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
        f"{LATENCY_MS:g} ms, limit {RPM:g}/min (or {TPM:g} tokens/min) counted per wall-clock second; "
        f"concurrency {opts.concurrency} each"
    )
    notes = [
        "steady rate: the mock's accepted requests a second over the whole seconds of the run, first and last left out, all shards together",
        "without the shared limit, four processes given --rpm 3000 each sent four times the limit (issue 12)",
        "--tpm: the share in requests a second, of the limit over the tokens a request counts on arrival;"
        " the shared pace took no token lease before issue 20. The mock counts a prompt at 4 characters"
        " a token, 15 % more than pipeline's exact count of this input: pipeline reserves less than it"
        " is charged, and its 429s teach the rate finder the rest",
    ]
    return ScenarioResult(
        "shards", title, runs=[], checks=checks, notes=notes, limit_per_second=RPM / 60, load_before=load
    )


SCENARIOS = {"shards": shards}
