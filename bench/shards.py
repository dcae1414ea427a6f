"""Shards sharing one limit through Redis (issue 12): 4 and 16 `pipeline run --shard K/N`
processes at once against a mock enforcing 3,000 requests a minute, with the limit given
(`--rpm 3000`) and found together; 4 given `--tpm` against one counting each request's prompt
and max_tokens on arrival (issue 20); and 16 finding a limit of 60,000 a minute together, with
20 ms answers (issue 21: one Redis for 10,000 requests a second). Then `pipeline merge`. Judged
on the mock's own count, and on what the store spent: its CPU a request (INFO cpu) and the
calls made to it a request (INFO commandstats), with the shards' own CPU beside it.
BENCH_SHARDS picks cases by their folder's name, comma-separated: BENCH_SHARDS=16-found-60000
runs the last alone."""

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.inputs import input_file, input_ids, mean_token_cost
from bench.mock import PIPELINE, MockFlags, running_mock
from bench.report import Check, ScenarioResult
from bench.runs import ROOT
from bench.scenarios import Done, Options

TPM = 300_000.0  # counted as OpenAI documents it: each request's prompt and max_tokens, on arrival
# What one Redis may spend on a request, and the calls to it a request: at 50 us of its CPU, one
# core serves 20,000 requests a second, or 10,000 leaving it half idle.
STORE_CPU_US = 50.0
ROUND_TRIPS = 1.0
SHARDS_NICE = 5  # the shards' priority under the mock's and the store's (see _below_the_server)


@dataclass(frozen=True, slots=True)
class Case:
    shards: int
    requests: int
    limit: str  # "rpm": --rpm given; "found": none given; "tpm": --tpm given, the mock limiting tokens alone
    least: float  # share of the limit, at least
    most: float  # 429s, at most
    rpm: float = 3000.0
    latency_ms: float = 50.0
    store_checked: bool = False  # the store's CPU a request is a target (else a figure)


CASES = (
    Case(4, 3000, "rpm", 0.95, 0.005),
    Case(4, 3000, "found", 0.90, 0.02),
    Case(16, 1200, "rpm", 0.95, 0.005),
    Case(16, 1200, "found", 0.90, 0.02),
    Case(4, 3000, "tpm", 0.95, 0.005),
    Case(16, 20_000, "found", 0.90, 0.02, rpm=60_000.0, latency_ms=20.0, store_checked=True),
    # The same with the limit given, nothing to find: what sixteen processes reach on this
    # machine at all (on two cores they need most of both at 1,000 requests a second).
    Case(16, 20_000, "rpm", 0.90, 0.02, rpm=60_000.0, latency_ms=20.0, store_checked=True),
    # 16 finding 100 a second whose answers take 2 s (BOOT2's): whatever bounds the ramp's
    # first seconds must not bound a server that is slow to answer, not full.
    Case(16, 2400, "found", 0.90, 0.02, rpm=6000.0, latency_ms=2000.0),
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


def _store_figures(url: str) -> tuple[float, int]:
    """The store's CPU seconds so far, and the calls made to it: every command a client sent
    (a script's own commands run inside its call, and are not counted)."""
    import redis

    client: Any = redis.Redis.from_url(url)
    try:
        cpu = client.info("cpu")
        commands = client.info("commandstats")
    finally:
        client.close()
    calls = sum(
        stats["calls"]
        for name, stats in commands.items()
        if name.removeprefix("cmdstat_").split("|")[0]
        in ("eval", "evalsha", "ping", "script", "hello", "client")
    )
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]), int(calls)


def _wait(proc: subprocess.Popen[bytes]) -> tuple[int, float]:
    """A shard's exit code and its CPU seconds (user and system)."""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_utime + usage.ru_stime


def _below_the_server() -> None:
    """A shard runs at a lower priority than the mock and Redis, as a client beside a server on
    machines of its own: sharing two cores at equal priority, the mock fell seconds behind, then
    counted what waited in its sockets in one second (1,391 in a second the shards took 723 starts
    in), and the 429s measured its lag: 16 shards beside a busy loop, 0.35 to 5.13 % (five runs)
    where 0.24 to 0.91 % (four) with the shards at SHARDS_NICE."""
    os.nice(SHARDS_NICE)


def _folder(case: Case) -> str:
    return f"{case.shards}-{case.limit}-{case.rpm:g}"


def _case(opts: Options, case: Case, requests: int) -> dict[str, Any]:
    given = {
        "rpm": f"--rpm {case.rpm:g}",
        "found": f"finding {case.rpm:g}/min",
        "tpm": f"--tpm {TPM:g} (counted on arrival)",
    }
    name = f"{case.shards} shards, {given[case.limit]}, {case.latency_ms:g} ms"
    print(f"[bench] shards: {name} on {requests:,} requests ...", file=sys.stderr, flush=True)
    input = input_file(opts.out / "inputs", requests)
    folder = opts.out / "runs" / "shards" / _folder(case)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    if case.limit == "tpm":
        flags = MockFlags(latency_ms=case.latency_ms, tpm=TPM, tpm_count="arrival")
        per_second = TPM / 60 / mean_token_cost(input, count_as="arrival")  # requests a second
    else:
        flags, per_second = MockFlags(latency_ms=case.latency_ms, rpm=case.rpm), case.rpm / 60
    with _redis(folder / "redis") as store, running_mock(flags, log=folder / "mock.log") as mock:
        started = time.monotonic()
        procs = []
        for k in range(1, case.shards + 1):
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
                f"{k}/{case.shards}",
                "--shared-limit",
                store,
                "--concurrency",
                str(opts.concurrency),
                "--quiet",
            ]
            cmd += {"rpm": ["--rpm", f"{case.rpm:g}"], "tpm": ["--tpm", f"{TPM:g}"]}.get(case.limit, [])
            log = (folder / f"shard-{k}.log").open("wb")
            procs.append(
                subprocess.Popen(
                    cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, preexec_fn=_below_the_server
                )
            )
        waited = [_wait(p) for p in procs]
        wall = time.monotonic() - started
        stats = mock.stats()
        mock_cpu = mock.cpu_seconds()
        store_cpu, calls = _store_figures(store)
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
    sent = max(sum(statuses.values()), 1)
    codes = [code for code, _ in waited]
    shards_cpu = sum(cpu for _, cpu in waited)
    print(
        f"[bench]   exits {sorted(set(codes))}, {wall:.1f} s, {len(got):,} merged; CPU: shards "
        f"{shards_cpu:.1f} s, mock {mock_cpu:.1f} s, store {store_cpu:.2f} s; {calls:,} calls to the store",
        file=sys.stderr,
        flush=True,
    )
    accepted = {int(k): v for k, v in stats.get("accepted_per_second", {}).items()}
    refused = {int(k): v for k, v in stats.get("refused_per_second", {}).items()}
    seconds = range(min(accepted | refused, default=0), max(accepted | refused, default=-1) + 1)
    timeline = " ".join(f"{accepted.get(s, 0)}/{refused.get(s, 0)}" for s in seconds)
    print(f"[bench]   accepted/refused a second: {timeline}", file=sys.stderr, flush=True)
    return {
        "name": name,
        "limit": per_second,
        "codes": codes,
        "wall": wall,
        "steady": _steady(stats),
        "share_429": statuses.get("429", 0) / sent,
        "lost": len(wanted - got),
        "merge": merged.returncode,
        "store_us": store_cpu / sent * 1e6,
        "round_trips": calls / sent,
        "shards_cpu": shards_cpu,
        "mock_cpu": mock_cpu,
        "accepted_per_second": stats.get("accepted_per_second", {}),
        "refused_per_second": stats.get("refused_per_second", {}),
    }


def shards(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    checks: list[Check] = []
    picked = [name for name in os.environ.get("BENCH_SHARDS", "").split(",") if name]
    for case in CASES:
        if picked and _folder(case) not in picked:
            continue
        n = max(1, round(case.requests * opts.scale))
        got = _case(opts, case, n)
        limit = got["limit"]
        label = f"{got['name']}, {n:,} requests"
        checks += [
            Check(
                f"{label}: steady rate, all together",
                f"{got['steady'] / limit:.1%} of the limit",
                f"≥ {case.least:.0%}",
                got["steady"] >= case.least * limit,
            ),
            Check(
                f"{label}: 429s",
                f"{got['share_429']:.2%} of answers",
                f"≤ {case.most:.1%}",
                got["share_429"] <= case.most,
            ),
            Check(
                f"{label}: every shard exited 0, merged, none lost",
                f"exits {sorted(set(got['codes']))}, merge {got['merge']}, lost {got['lost']:,}",
                "0, 0, 0",
                set(got["codes"]) == {0} and got["merge"] == 0 and got["lost"] == 0,
            ),
            Check(
                f"{label}: calls to the store a request",
                f"{got['round_trips']:.2f}",
                f"< {ROUND_TRIPS:g}",
                got["round_trips"] < ROUND_TRIPS,
            ),
            Check(
                f"{label}: the store's CPU a request",
                f"{got['store_us']:.0f} us",
                f"< {STORE_CPU_US:g} us" if case.store_checked else None,
                got["store_us"] < STORE_CPU_US if case.store_checked else None,
            ),
            Check(
                f"{label}: CPU of the shards, the mock (a core-second a wall second at most, each)",
                f"{got['shards_cpu']:.1f} s, {got['mock_cpu']:.1f} s over {got['wall']:.1f} s "
                f"(shards {got['shards_cpu'] / n * 1e6:,.0f} us a request)",
            ),
            Check(f"{label}: wall", f"{got['wall']:.1f} s (floor {n / limit:.1f} s)"),
        ]
    title = (
        "pipeline run --shard K/N --shared-limit (a local redis-server), all at once; mock: latency "
        "and limit per case (requests a minute, or tokens a minute), counted per wall-clock second; "
        f"concurrency {opts.concurrency} each"
    )
    notes = [
        "steady rate: the mock's accepted requests a second over the whole seconds of the run, first and last left out, all shards together",
        "without the shared limit, four processes given --rpm 3000 each sent four times the limit (issue 12)",
        "--tpm: the share in requests a second, of the limit over the tokens a request counts on arrival;"
        " the shared pace took no token lease before issue 20. The mock counts a prompt at 4 characters"
        " a token, 15 % more than pipeline's exact count of this input: pipeline reserves less than it"
        " is charged, and its 429s teach the rate finder the rest",
        "the store: its CPU (INFO cpu) and the calls made to it (INFO commandstats: scripts, pings),"
        " each over the requests the mock answered (429s too). 16 shards finding 60,000/min paid 136 us"
        " and 0.51 calls a request, at 49.6 % of the limit and 8.5 % 429s, before issue 21",
    ]
    return ScenarioResult("shards", title, runs=[], checks=checks, notes=notes, load_before=load)


SCENARIOS = {"shards": shards}
