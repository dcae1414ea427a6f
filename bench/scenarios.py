"""The scenarios, each a function of the options and of the scenarios already run (a later one
compares itself with an earlier one's figures, or runs the reference it needs)."""

from __future__ import annotations

import compileall
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from bench import instructions
from bench.inputs import input_file, mean_reservation, mean_token_cost
from bench.measure import StopWhen, plateau
from bench.mock import MockFlags
from bench.report import Check, ScenarioResult
from bench.runs import BARE, NAIVE, PIPELINE_RUN, Client, ClientRun, Kind, run_client

LATENCY_MS = 50.0
FAULTS = MockFlags(
    latency_ms=LATENCY_MS,
    fail_rate=0.05,
    rate_429=0.02,
    retry_after=1.0,
    drop_rate=0.01,
    malformed_rate=0.01,
    error_rate=0.01,
)
RPM = 3000.0
TPM = 300_000.0
RSS_TARGET_MB = 100.0
# Interleaved pipeline / bare pairs in `clean`: with three, the median swung from 1.17x to
# 1.52x between runs a minute apart on an idle machine; five cost some 12 s more.
CLEAN_PAIRS = 5
CLEAN_CPU = 1.15  # the most pipeline's CPU per request may be, as a multiple of the bare loop's
STEADY_NOTE = (
    "steady req/s: the mock's accepted requests a second, first and last (partial) seconds left out;"
    " overall: succeeded / the client's wall time, start-up included"
)


@dataclass(frozen=True, kw_only=True)
class Options:
    out: Path
    requests: int = 10_000  # clean, latency, faults
    long_requests: int = 100_000  # faults: pipeline alone, long enough that a Retry-After is not the run
    rate_requests: int = 3_000  # rpm, tpm
    lines: int = 1_000_000  # memory
    concurrency: int = 256
    naive_cap: float = 60.0  # seconds the naive client may load the memory input
    scale: float = 1.0  # multiplies the request counts of the scenarios in bench.real


Done = dict[str, ScenarioResult]
Scenario = Callable[[Options, Done], ScenarioResult]


def _slug(client: Client) -> str:
    return re.sub(r"[^a-z0-9]+", "-", client.name.lower()).strip("-")


@cache
def _startup_cpu(out: Path, kind: Kind) -> float:
    """CPU seconds a client spends on an empty input: start-up, imports, shut-down."""
    print(f"[bench] start-up cost of {kind} (empty input) ...", file=sys.stderr, flush=True)
    client = Client(name=f"{kind} start-up", kind=kind)
    empty = input_file(out / "inputs", 0)
    run = run_client(
        client, input=empty, flags=MockFlags(), folder=out / "runs" / "startup" / kind, concurrency=1
    )
    return run.measurement.cpu


def _run(
    name: str,
    opts: Options,
    client: Client,
    input: Path,
    flags: MockFlags,
    *,
    stop_when: StopWhen | None = None,
    keep_results: bool = True,
    concurrency: int | None = None,
) -> ClientRun:
    print(f"[bench] {name}: {client.name} on {input.name} ...", file=sys.stderr, flush=True)
    run = run_client(
        client,
        input=input,
        flags=flags,
        folder=opts.out / "runs" / name / _slug(client),
        concurrency=concurrency or opts.concurrency,
        stop_when=stop_when,
        keep_results=keep_results,
    )
    run.startup_cpu = _startup_cpu(opts.out, client.kind)
    m = run.measurement
    print(
        f"[bench]   exit {m.exit_code}, {m.wall:.1f} s, {run.succeeded:,} succeeded, {run.lost:,} lost",
        file=sys.stderr,
        flush=True,
    )
    return run


def _ratio(check: str, a: float, b: float, target: float | None) -> Check:
    ratio = a / b if b else float("inf")
    if target is None:
        return Check(check, f"{ratio:.2f}x")
    return Check(check, f"{ratio:.2f}x", f"≤ {target:g}x", ratio <= target)


def _versus(pipe: ClientRun, other: ClientRun, *, cpu: float | None, wall: float | None) -> list[Check]:
    who = f"pipeline / {other.client.name}"
    checks = [_ratio(f"{who}, CPU per request", pipe.cpu_ms_per_request, other.cpu_ms_per_request, cpu)]
    if pipe.net_cpu_ms_per_request is not None and other.net_cpu_ms_per_request is not None:
        net = _ratio(
            f"{who}, CPU per request net of start-up",
            pipe.net_cpu_ms_per_request,
            other.net_cpu_ms_per_request,
            None,
        )
        checks.append(net)
    checks.append(_ratio(f"{who}, wall", pipe.measurement.wall, other.measurement.wall, wall))
    return checks


def _peak(run: ClientRun) -> float:
    # The sampled peak, not ru_maxrss: Linux carries the high-water mark of the image a
    # process had before exec into its ru_maxrss, so a client forked from this (large)
    # harness would be charged for the harness's memory.
    return run.measurement.peak_rss_mb


def _rss_check(run: ClientRun) -> Check:
    peak = _peak(run)
    return Check(
        f"{run.client.name} peak RSS", f"{peak:.1f} MB", f"≤ {RSS_TARGET_MB:g} MB", peak <= RSS_TARGET_MB
    )


def _lost_check(run: ClientRun) -> Check:
    return Check(f"{run.client.name} lost jobs", f"{run.lost:,}", "0", run.lost == 0)


def _throughput(name: str, title: str, opts: Options, flags: MockFlags) -> ScenarioResult:
    load = os.getloadavg()
    input = input_file(opts.out / "inputs", opts.requests)
    runs = [_run(name, opts, c, input, flags) for c in (BARE, NAIVE, PIPELINE_RUN)]
    bare, naive, pipe = runs
    checks = [
        *_versus(pipe, bare, cpu=1.5, wall=2.0),
        *_versus(pipe, naive, cpu=None, wall=None),
        _rss_check(pipe),
        _lost_check(pipe),
    ]
    return ScenarioResult(name, title, runs, checks, load_before=load)


def _byte_compiled() -> None:
    """pipeline's modules byte-compiled, as an installed package's are: where the environment
    says not to write bytecode (PYTHONDONTWRITEBYTECODE), every run of a checkout compiled
    them again, some 60 ms of CPU the bare loop (its few lines) does not pay."""
    import pipeline

    compileall.compile_dir(Path(pipeline.__file__).parent, quiet=1)


def clean(opts: Options, done: Done) -> ScenarioResult:
    """pipeline's CPU per request against the bare loop's, as the median of CLEAN_PAIRS
    interleaved pairs (pipeline, bare, pipeline, bare, ...): a machine whose load moves
    between two runs moves both of a pair, not one side of every comparison."""
    title = f"{opts.requests:,} requests, concurrency {opts.concurrency}, mock: 0 ms, no faults"
    load = os.getloadavg()
    input = input_file(opts.out / "inputs", opts.requests)
    _byte_compiled()
    pairs: list[tuple[ClientRun, ClientRun]] = []
    for k in range(1, CLEAN_PAIRS + 1):
        pipe_client = PIPELINE_RUN if k == 1 else Client(name=f"pipeline #{k}", kind="pipeline")
        bare_client = BARE if k == 1 else Client(name=f"bare aiohttp #{k}", kind="bare")
        pairs.append(
            (
                _run("clean", opts, pipe_client, input, MockFlags()),
                _run("clean", opts, bare_client, input, MockFlags()),
            )
        )
    naive = _run("clean", opts, NAIVE, input, MockFlags())
    pipes = [pipe for pipe, _ in pairs]

    def median_of(label: str, ratio: Callable[[ClientRun, ClientRun], float], target: float | None) -> Check:
        ratios = sorted(ratio(pipe, bare) for pipe, bare in pairs)
        mid = statistics.median(ratios)
        shown = ", ".join(f"{r:.2f}" for r in ratios)
        label = f"pipeline / bare aiohttp, {label} (median of {len(ratios)} pairs: {shown})"
        if target is None:
            return Check(label, f"{mid:.2f}x")
        return Check(label, f"{mid:.2f}x", f"≤ {target:g}x", mid <= target)

    def net(pipe: ClientRun, bare: ClientRun) -> float:
        return (pipe.net_cpu_ms_per_request or 0.0) / (bare.net_cpu_ms_per_request or 1.0)

    # Load only ever adds CPU time (a cache or a core shared, a slower clock): each side's
    # least is the figure it moves least, shown beside the judged median.
    least = min(p.cpu_ms_per_request for p in pipes) / min(b.cpu_ms_per_request for _, b in pairs)
    checks = [
        median_of("CPU per request", lambda p, b: p.cpu_ms_per_request / b.cpu_ms_per_request, CLEAN_CPU),
        Check("pipeline / bare aiohttp, CPU per request, least of each side", f"{least:.2f}x"),
        *_instruction_ratio(opts, input),
        median_of("CPU per request net of start-up", net, None),
        median_of("wall", lambda p, b: p.measurement.wall / b.measurement.wall, 2.0),
        *_versus(pipes[0], naive, cpu=None, wall=None),
        _rss_check(max(pipes, key=_peak)),
        *(_lost_check(pipe) for pipe in pipes),
    ]
    runs = [run for pair in pairs for run in pair] + [naive]
    return ScenarioResult("clean", title, runs, checks, load_before=load)


def _instruction_ratio(opts: Options, input: Path) -> list[Check]:
    """pipeline's instructions over the bare loop's on the same input, where valgrind is."""
    if not instructions.available():
        return []
    counts = []
    for client in (PIPELINE_RUN, BARE):
        print(f"[bench] clean: {client.name} under callgrind ...", file=sys.stderr, flush=True)
        folder = opts.out / "runs" / "clean-callgrind" / _slug(client)
        counts.append(
            instructions.instructions(client, input=input, folder=folder, concurrency=opts.concurrency)
        )
    pipe, bare = counts
    if pipe is None or bare is None:
        return [Check("pipeline / bare aiohttp, instructions (callgrind)", "no count")]
    label = f"pipeline / bare aiohttp, instructions (callgrind: {pipe / 1e6:,.0f}M / {bare / 1e6:,.0f}M)"
    return [Check(label, f"{pipe / bare:.3f}x")]


def latency(opts: Options, done: Done) -> ScenarioResult:
    title = f"{opts.requests:,} requests, concurrency {opts.concurrency}, mock: {LATENCY_MS:g} ms, no faults"
    return _throughput("latency", title, opts, MockFlags(latency_ms=LATENCY_MS))


@dataclass(frozen=True)
class Reference:
    run: ClientRun
    source: str
    own: bool  # run here, so a row of this scenario's table


def _reference(name: str, of: str, opts: Options, done: Done, flags: MockFlags, lines: int) -> Reference:
    """pipeline's run in scenario `of`, or a run of its own when `of` was not run (or not on
    `lines` lines) in this session."""
    earlier = done.get(of)
    if earlier is not None and earlier.run(PIPELINE_RUN.name).requests == lines:
        return Reference(earlier.run(PIPELINE_RUN.name), f"the `{of}` scenario's pipeline run", own=False)
    client = Client(name=f"pipeline ({of} ref.)", kind="pipeline")
    run = _run(name, opts, client, input_file(opts.out / "inputs", lines), flags)
    return Reference(run, f"a reference run as in `{of}` (row `{client.name}`)", own=True)


def _fault_floor(faulty: ClientRun, clean: ClientRun) -> float:
    """The least `faulty.wall / clean.wall` a client could show: every attempt the mock saw
    (failed ones too) as cheap as a clean run's request, plus one Retry-After waited at the
    end, which a 429 to one of the last requests costs whatever the client. (A second 429
    to its retry, likely when a few dozen retries are in that last second, adds another.)"""
    statuses: dict[str, int] = faulty.mock.get("statuses", {})
    attempts = sum(statuses.values()) / max(faulty.requests, 1)
    return attempts + (FAULTS.retry_after + LATENCY_MS / 1000) / clean.measurement.wall


def faults(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    title = f"{opts.requests:,} requests, concurrency {opts.concurrency}, mock: {FAULTS.describe()}"
    input = input_file(opts.out / "inputs", opts.requests)
    runs = [_run("faults", opts, c, input, FAULTS) for c in (BARE, NAIVE, PIPELINE_RUN)]
    bare, naive, pipe = runs
    reference = _reference("faults", "latency", opts, done, MockFlags(latency_ms=LATENCY_MS), opts.requests)
    ref = reference.run
    if reference.own:
        runs.append(ref)
    # On a run of a few seconds, one Retry-After at the end is already most of the 1.3x
    # allowed: the target is judged on the long pair, where it is not.
    checks = [
        _lost_check(pipe),
        _ratio(
            f"pipeline wall under faults / without, {opts.requests:,} requests "
            f"(floor {_fault_floor(pipe, ref):.2f}x)",
            pipe.measurement.wall,
            ref.measurement.wall,
            None,
        ),
        Check("pipeline answers paid twice (mock answered_twice)", f"{pipe.mock.get('answered_twice', 0):,}"),
        *_versus(pipe, bare, cpu=None, wall=None),
        *_versus(pipe, naive, cpu=None, wall=None),
        _rss_check(pipe),
    ]
    if opts.long_requests:
        long_input = input_file(opts.out / "inputs", opts.long_requests)
        clean_long = _run(
            "faults",
            opts,
            Client(name="pipeline, long, no faults", kind="pipeline"),
            long_input,
            MockFlags(latency_ms=LATENCY_MS),
        )
        faults_long = _run(
            "faults", opts, Client(name="pipeline, long, faults", kind="pipeline"), long_input, FAULTS
        )
        runs += [clean_long, faults_long]
        checks[1:1] = [
            _lost_check(faults_long),
            Check(
                "pipeline, long, faults: answers paid twice", f"{faults_long.mock.get('answered_twice', 0):,}"
            ),
            _ratio(
                f"pipeline wall under faults / without, {opts.long_requests:,} requests "
                f"(floor {_fault_floor(faults_long, clean_long):.2f}x)",
                faults_long.measurement.wall,
                clean_long.measurement.wall,
                1.3,
            ),
        ]
    notes = [
        f"wall without faults from {reference.source}: {ref.measurement.wall:.2f} s",
        "floor: what the run would take were every attempt the mock saw (the failed ones too) as cheap"
        f" as a request of the clean run, plus one Retry-After ({FAULTS.retry_after:g} s) at the end,"
        " which a 429 to one of the last requests costs any client that honours it",
        "the bare loop sends each request once and retries nothing: its `lost` is the fault rate",
        f"mock answers for pipeline: {pipe.mock.get('statuses')}",
    ]
    return ScenarioResult("faults", title, runs, checks, notes, load_before=load)


def _rate_checks(run: ClientRun, limit: float, *, given: bool) -> list[Check]:
    least, most = (0.97, 0.005) if given else (0.90, 0.02)
    return _rate_targets(run, limit, least=least, most=most)


def _rate_targets(run: ClientRun, limit: float, *, least: float, most: float) -> list[Check]:
    """At least `least` of `limit` (requests a second) at the steady rate, at most `most` of the
    mock's answers 429s, no job lost."""
    rate = run.steady_rate() or 0.0
    return [
        Check(
            f"{run.client.name}: steady rate",
            f"{rate / limit:.1%} of the limit",
            f"≥ {least:.0%}",
            rate >= least * limit,
        ),
        Check(
            f"{run.client.name}: 429s",
            f"{run.share_429:.2%} of answers",
            f"≤ {most:.1%}",
            run.share_429 <= most,
        ),
        _lost_check(run),
    ]


def rpm(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    flags = MockFlags(latency_ms=LATENCY_MS, rpm=RPM)
    title = f"{opts.rate_requests:,} requests, concurrency {opts.concurrency}, mock: {flags.describe()}"
    input = input_file(opts.out / "inputs", opts.rate_requests)
    given = Client(name=f"pipeline --rpm {RPM:g}", kind="pipeline", rpm=RPM)
    unknown = Client(name="pipeline, no --rpm", kind="pipeline")
    runs = [_run("rpm", opts, c, input, flags) for c in (given, unknown, NAIVE)]
    limit = RPM / 60
    checks = [*_rate_checks(runs[0], limit, given=True), *_rate_checks(runs[1], limit, given=False)]
    notes = [
        f"limit: {limit:g} requests a second, counted by the mock per wall-clock second",
        STEADY_NOTE,
    ]
    return ScenarioResult("rpm", title, runs, checks, notes, limit_per_second=limit, load_before=load)


def tpm(opts: Options, done: Done) -> ScenarioResult:
    """--tpm against a mock counting as OpenAI documents (a request's prompt and max_tokens, on
    arrival), then against one counting what answers use: pipeline keeps what a request
    reserved, so the second gets the share of the reservations its answers use."""
    load = os.getloadavg()
    input = input_file(opts.out / "inputs", opts.rate_requests)
    reserved = mean_reservation(input)
    costs = {count: mean_token_cost(input, count_as=count) for count in ("arrival", "usage")}
    runs, limits, checks = [], {}, []
    for count, naive in (("arrival", True), ("usage", False)):
        flags = MockFlags(latency_ms=LATENCY_MS, tpm=TPM, tpm_count=count)
        cost = costs[count]
        given = Client(name=f"pipeline --tpm {TPM:g}, {count}", kind="pipeline", tpm=TPM)
        for client in (given, NAIVE) if naive else (given,):
            runs.append(_run(f"tpm-{count}", opts, client, input, flags))
            limits[client.name] = TPM / 60 / cost
        least = 0.97 * min(cost / reserved, 1.0)
        checks += _rate_targets(runs[-2 if naive else -1], limits[given.name], least=least, most=0.005)
    title = (
        f"{opts.rate_requests:,} requests, concurrency {opts.concurrency}, mock: latency {LATENCY_MS:g} ms, "
        f"--tpm {TPM:g} counted per second on arrival (prompt + max_tokens), then as answers use them"
    )
    charged, used = costs["arrival"], costs["usage"]
    notes = [
        f"limit: {TPM / 60:,.0f} tokens a second; the mock counts a request {charged:.1f} on arrival"
        f" (a prompt at 4 characters a token), its answer uses {used:.1f}: {TPM / 60 / charged:.1f} or"
        f" {TPM / 60 / used:.1f} requests a second",
        f"pipeline reserves {reserved:.1f} a request (an exact prompt count) and keeps it, as a server"
        f" counting on arrival counted it: against one counting usage its share is what answers use of"
        f" it, {used / reserved:.0%} (target: 97 % of that)",
    ]
    return ScenarioResult("tpm", title, runs, checks, notes, load_before=load, run_limits=limits)


def memory(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    title = f"{opts.lines:,} lines, concurrency {opts.concurrency}, mock: 0 ms, no faults"
    started = time.perf_counter()
    reused = (opts.out / "inputs" / f"requests-{opts.lines}.jsonl").exists()
    big = input_file(opts.out / "inputs", opts.lines)
    made = "reused" if reused else f"generated in {time.perf_counter() - started:.0f} s"
    pipe = _run("memory", opts, PIPELINE_RUN, big, MockFlags(), keep_results=False)
    reference = _reference("memory", "clean", opts, done, MockFlags(), opts.requests)
    ref = reference.run
    naive = _run(
        "memory", opts, NAIVE, big, MockFlags(), stop_when=plateau(cap=opts.naive_cap), keep_results=False
    )
    low, median, high = pipe.measurement.steady()
    ratio = _peak(pipe) / _peak(ref)
    checks = [
        _rss_check(pipe),
        Check(
            f"pipeline peak RSS, {opts.lines:,} lines / {ref.requests:,} lines",
            f"{_peak(pipe):.1f} / {_peak(ref):.1f} MB = {ratio:.2f}x",
            "≤ 1.10x",
            ratio <= 1.10,
        ),
        _lost_check(pipe),
    ]
    page = pipe.said.get("report_html_bytes")
    if page is not None:
        checks.append(Check("its report.html: size", f"{page / 1e6:.2f} MB", "≤ 5 MB", page <= 5e6))
        drawn = float(pipe.said.get("report_seconds", 0.0))
        checks.append(
            Check("its reports drawn again (pipeline report OUT)", f"{drawn:.1f} s", "seconds", drawn <= 10)
        )
    samples = ", ".join(f"{t:.0f} s: {mb:.0f} MB" for t, mb in pipe.measurement.timeline(8))
    loaded = next((e for e in naive.events if e.get("event") == "loaded"), None)
    notes = [
        f"input: {big} ({big.stat().st_size / 1e6:,.0f} MB, {made})",
        f"pipeline RSS after the first 10% of the run: min {low:.1f}, median {median:.1f}, peak {high:.1f} MB",
        f"pipeline RSS over time: {samples}",
        f"the {ref.requests:,}-line peak is from {reference.source}",
        (
            f"naive client: loaded {loaded['lines']:,} lines in {loaded['seconds']:.1f} s, RSS then {loaded['maxrss_mb']:,.0f} MB;"
            if loaded
            else "naive client: never finished loading the file;"
        )
        + f" peak {_peak(naive):,.0f} MB after {naive.measurement.wall:.0f} s"
        + (
            " (stopped by the harness once RSS stopped growing, or at the cap)"
            if naive.measurement.killed
            else ""
        ),
    ]
    runs = [pipe, naive] + ([ref] if reference.own else [])
    return ScenarioResult("memory", title, runs, checks, notes, load_before=load)


SCENARIOS: dict[str, Scenario] = {
    "clean": clean,
    "latency": latency,
    "faults": faults,
    "rpm": rpm,
    "tpm": tpm,
    "memory": memory,
}
