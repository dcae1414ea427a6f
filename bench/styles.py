"""Limits counted the ways servers count them (issue 21): pipeline, told no limit, against

- `styles`: a bucket refilled continuously holding one second of its rate (as Anthropic
  documents its limits), one holding a minute's (the burst), and a token limit counted on
  arrival with max_tokens (as OpenAI documents) or as answers use it; each 429 saying its wait
  by `Retry-After` rounded up with `retry-after-ms`, by `Retry-After` rounded up alone, in its
  message only, or not at all. The targets are issue 9's, met on the per-second window;
- `moving`: a limit that drops and rises back during the run;
- `models`: two models in one job, one of them limited on its own.

Request counts are multiplied by `--scale`, but for `moving`, whose schedule is in seconds, and
the burst's (a minute's quota and half again: fewer would all go in the burst).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from bench.inputs import input_file, mean_token_cost, models_input
from bench.mock import MockFlags
from bench.real import _scaled, _seconds
from bench.report import Check, ScenarioResult
from bench.runs import Client, ClientRun
from bench.scenarios import STEADY_NOTE, Done, Options, Scenario, _lost_check, _rate_targets, _run

LATENCY_MS = 50.0
CONCURRENCY = 256
SAID = {  # how each 429 says its wait: --wait-said, and in the table
    "ms": "Retry-After (s, up) + retry-after-ms",
    "seconds": "Retry-After (s, up)",
    "message": "in the message",
    "none": "not said",
}
ONE_SECOND = MockFlags(latency_ms=LATENCY_MS, limit_style="bucket", bucket_capacity=1)
A_MINUTE = MockFlags(latency_ms=LATENCY_MS, limit_style="bucket", bucket_capacity=60)
TPM = 120_000.0
TPM_WINDOW = MockFlags(latency_ms=LATENCY_MS, tpm=TPM)  # counted per second, as OpenAI's


@dataclass(frozen=True)
class StyleCase:
    key: str
    what: str  # the counting, as the table says it
    requests: int
    flags: MockFlags
    rpm: float | None  # the request limit (None: tokens limit, the rate follows from the input)
    least: float | None  # of the limit, at the steady rate (None: no rate target)
    most: float  # share of answers that are 429s


def _rate_cases(way: str, *, keys: str) -> list[StyleCase]:
    """Issue 9's cases on a bucket holding one second, each 429 saying its wait `way`."""
    flags = replace(ONE_SECOND, wait_said=way)
    cases = (
        ("a", 3_000, 3_000.0, 0.95, 0.01),
        ("b", 1_200, 3_000.0, 0.93, 0.02),
        ("c", 600, 600.0, 0.93, 0.02),
        ("d", 6_000, 12_000.0, 0.93, 0.02),
    )
    return [
        StyleCase(key, "bucket 1 s", n, replace(flags, rpm=rpm), rpm, least, most)
        for key, n, rpm, least, most in cases
        if key in keys
    ]


def _cases() -> list[StyleCase]:
    cases = _rate_cases("ms", keys="abcd")  # the server: both headers, rounded up
    for way in ("seconds", "message", "none"):
        cases += _rate_cases(way, keys="a")
    for way in SAID:  # a minute's quota at once, then its refill: the burst costs 429s
        burst = replace(A_MINUTE, rpm=1_200.0, wait_said=way)
        cases.append(StyleCase("e", "bucket 60 s", 1_800, burst, 1_200.0, None, 0.03))
    for way in SAID:
        tokens = replace(TPM_WINDOW, tpm_count="arrival", wait_said=way)
        cases.append(StyleCase("f", "tpm on arrival", 600, tokens, None, 0.95, 0.005))
    used = replace(TPM_WINDOW, tpm_count="usage", wait_said="ms")
    cases.append(StyleCase("g", "tpm as used", 600, used, None, 0.95, 0.005))
    return cases


def styles(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    runs: list[ClientRun] = []
    checks: list[Check] = []
    limits: dict[str, float] = {}
    for case in _cases():
        # The burst's case is its minute's quota and half again, at any scale: less is all burst.
        n = case.requests if case.key == "e" else _scaled(opts, case.requests)
        input = input_file(opts.out / "inputs", n)
        f = case.flags
        if case.rpm is not None:
            limit, at = case.rpm / 60, f"{case.rpm:,.0f}/min"
        else:  # requests a second the tokens allow, counted the server's way
            limit, at = TPM / 60 / mean_token_cost(input, count_as=f.tpm_count), f"{TPM:,.0f} tokens/min"
        said = SAID[f.wait_said or "ms"]
        name = f"({case.key}) {n:,} at {at}, {case.what}, waits {said}"
        client = Client(name=name, kind="pipeline", tpm=TPM if case.rpm is None else None)
        run = _run("styles", opts, client, input, f, concurrency=CONCURRENCY)
        runs.append(run)
        if case.least is not None:  # the burst's steady rate is mostly its burst: no % for it
            limits[name] = limit
            checks += _rate_targets(run, limit, least=case.least, most=case.most)
        else:
            checks += [
                Check(
                    f"{name}: 429s",
                    f"{run.share_429:.2%} of answers",
                    f"≤ {case.most:.0%}",
                    run.share_429 <= case.most,
                ),
                Check(
                    f"{name}: wall",
                    f"{run.measurement.wall:.1f} s (floor {max(n - limit * 60, 0) / limit:.0f} s: the"
                    " burst at once, the rest at the refill)",
                ),
                _lost_check(run),
            ]
    title = (
        f"pipeline, no --rpm, concurrency {CONCURRENCY}, mock {LATENCY_MS:g} ms: issue 9's cases on a"
        " bucket holding 1 s, a minute's burst, a --tpm counted on arrival and as used; each over"
        " the ways a 429 says its wait"
    )
    notes = [
        "(a)-(d): a bucket refilled continuously holding one second of its rate (Anthropic's);"
        " (e) one holding a minute's quota (1,200 at once, then 20 a second);"
        f" (f), (g): --tpm {TPM:g} given to pipeline, the mock counting it per second, on arrival"
        " (prompt + max_tokens, OpenAI's way) or as the answer uses it; % of limit: of the requests"
        " a second the tokens allow, counted the mock's way",
        "waits: Retry-After rounded up to whole seconds with retry-after-ms (the issue's server);"
        " Retry-After rounded up alone; 'Please try again in 71ms' in the message only; not said",
        STEADY_NOTE,
    ]
    return ScenarioResult("styles", title, runs, checks, notes, load_before=load, run_limits=limits)


# moving: a limit that drops, then rises back ---------------------------------------------

HIGH, LOW = 3_000.0, 1_200.0  # a minute
DROP, RISE = 20.0, 40.0  # seconds after the first request
MOVING_REQUESTS = 3_600  # enough to run 35 s past the rise at the limit
MOVING_LATENCY_MS = 200.0
USED, WITHIN, SPAN = 0.90, 30.0, 5  # the rise used at 90 % within 30 s, over 5 s


def _per_offset(stats: dict[str, Any], key: str) -> dict[int, int]:
    """The mock's counts a second (`key`), by whole seconds after its first request."""
    start = int(stats.get("first_request") or 0)
    return {int(s) - start: v for s, v in stats.get(key, {}).items()}


def _mean(per: dict[int, int], since: float, until: float) -> float:
    seconds = range(int(since), int(until))
    return float(statistics.mean(per.get(s, 0) for s in seconds)) if seconds else 0.0


def moving(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    flags = MockFlags(
        latency_ms=MOVING_LATENCY_MS, rpm=HIGH, limit_changes=(f"{DROP:g}={LOW:g},{RISE:g}={HIGH:g}",)
    )
    input = input_file(opts.out / "inputs", MOVING_REQUESTS)
    client = Client(name="pipeline, no --rpm", kind="pipeline")
    run = _run("moving", opts, client, input, flags, concurrency=CONCURRENCY)
    accepted = _per_offset(run.mock, "accepted_per_second")
    refused = _per_offset(run.mock, "refused_per_second")
    end = max(accepted, default=0)
    low, high = LOW / 60, HIGH / 60
    after_drop = _mean(accepted, DROP + 2, RISE)
    refused_low = sum(refused.get(s, 0) for s in range(int(DROP + 2), int(RISE)))
    sent_low = refused_low + sum(accepted.get(s, 0) for s in range(int(DROP + 2), int(RISE)))
    used_at = next(
        (t - RISE for t in range(int(RISE), end - SPAN + 1) if _mean(accepted, t, t + SPAN) >= USED * high),
        None,
    )
    steps = ", ".join(f"{_mean(accepted, t, t + SPAN):.0f}" for t in range(int(RISE), end - SPAN + 1, SPAN))
    checks = [
        Check(
            f"after the drop to {low:g}/s (from {DROP + 2:g} s to the rise)",
            f"{after_drop / low:.1%} of it, {refused_low / max(sent_low, 1):.2%} 429s",
            f"≥ {USED:.0%}",
            after_drop >= USED * low,
        ),
        Check(
            f"the rise to {high:g}/s at {RISE:g} s: used at ≥ {USED:.0%} ({SPAN} s mean) after",
            "not within the run" if used_at is None else f"{used_at:.0f} s",
            f"≤ {WITHIN:g} s",
            used_at is not None and used_at <= WITHIN,
        ),
        Check("429s over the run", f"{run.share_429:.2%} of answers", "≤ 1 %", run.share_429 <= 0.01),
        _lost_check(run),
    ]
    title = (
        f"{MOVING_REQUESTS:,} requests, concurrency {CONCURRENCY}, pipeline with no --rpm, mock"
        f" {MOVING_LATENCY_MS:g} ms: a limit nobody states, {HIGH:,.0f}/min, {LOW:,.0f}/min from"
        f" {DROP:g} s, {HIGH:,.0f}/min again from {RISE:g} s"
    )
    notes = [
        "seconds after the mock's first request, counted per wall-clock second (±1 s); not scaled",
        f"accepted a second after the rise, {SPAN} s means: {steps}",
    ]
    # No % column: the limit moves; the checks hold each part of the run to its own.
    return ScenarioResult("moving", title, [run], checks, notes, load_before=load)


# models: two models in one job, one limited on its own ---------------------------------------

PAID, LIMITED = "bench/paid", "bench/limited:free"
PAID_LINES, LIMITED_LINES, LIMITED_RPM = 2_000, 240, 120.0
MODELS_LATENCY_MS, MODELS_CONCURRENCY = 1000.0, 200
MODELS_WALL, MODELS_USED, MODELS_429 = 1.2, 0.90, 0.02


def _done_after(run: ClientRun, model: str) -> float:
    """Seconds from the mock's first request to the answer of its last accepted one of `model`."""
    span = run.mock.get("models", {}).get(model, {})
    first, last = run.mock.get("first_request"), span.get("last_accepted")
    if first is None or last is None:
        return float("inf")
    return float(last - first) + MODELS_LATENCY_MS / 1000


def _model_rate(run: ClientRun, model: str) -> float:
    """Accepted a second of `model`, over the whole seconds between its first and last."""
    per = {
        int(k): v for k, v in run.mock.get("models", {}).get(model, {}).get("accepted_per_second", {}).items()
    }
    if len(per) < 3:
        return 0.0
    return _mean(per, min(per) + 1, max(per))


def models(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    paid, limited = _scaled(opts, PAID_LINES), _scaled(opts, LIMITED_LINES)
    flags = MockFlags(latency_ms=MODELS_LATENCY_MS, model_rpm=((LIMITED, LIMITED_RPM),))
    folder: Path = opts.out / "inputs"
    both = Client(name=f"pipeline, {paid:,} {PAID} + {limited:,} {LIMITED}", kind="pipeline")
    alone = Client(name=f"pipeline, the {paid:,} {PAID} alone", kind="pipeline")
    mixed = _run(
        "models",
        opts,
        both,
        models_input(folder, ((PAID, paid), (LIMITED, limited))),
        flags,
        concurrency=MODELS_CONCURRENCY,
    )
    single = _run(
        "models", opts, alone, models_input(folder, ((PAID, paid),)), flags, concurrency=MODELS_CONCURRENCY
    )
    with_other, by_itself = _done_after(mixed, PAID), _done_after(single, PAID)
    ratio = with_other / by_itself if by_itself else float("inf")
    rate, limit = _model_rate(mixed, LIMITED), LIMITED_RPM / 60
    checks = [
        Check(
            f"{PAID}'s {paid:,} done, beside {LIMITED} / alone",
            f"{with_other:.1f} / {by_itself:.1f} s = {ratio:.2f}x",
            f"≤ {MODELS_WALL:g}x",
            ratio <= MODELS_WALL,
        ),
        Check(
            f"{LIMITED}: steady rate",
            f"{rate / limit:.1%} of its {LIMITED_RPM:g}/min",
            f"≥ {MODELS_USED:.0%}",
            rate >= MODELS_USED * limit,
        ),
        Check(
            f"{both.name}: 429s",
            f"{mixed.share_429:.2%} of answers",
            f"≤ {MODELS_429:.0%}",
            mixed.share_429 <= MODELS_429,
        ),
        *[_lost_check(r) for r in (mixed, single)],
        *[
            Check(
                f"{r.client.name}: answered twice",
                f"{r.mock.get('answered_twice', 0):,}",
                "0",
                not r.mock.get("answered_twice"),
            )
            for r in (mixed, single)
        ],
    ]
    title = (
        f"{paid:,} lines for {PAID} and {limited:,} for {LIMITED} (allowed {LIMITED_RPM:g}/min, no"
        f" headers), spread through one input; answers in {_seconds(MODELS_LATENCY_MS)}, concurrency"
        f" {MODELS_CONCURRENCY}, pipeline told no limit; then {PAID}'s lines alone"
    )
    notes = [
        f"done: seconds from the mock's first request to the answer of its last accepted request of {PAID}",
        f"{LIMITED}'s steady rate: its accepted requests a second over the whole seconds between its"
        " first and last",
    ]
    return ScenarioResult("models", title, [mixed, single], checks, notes, load_before=load)


SCENARIOS: dict[str, Scenario] = {"styles": styles, "moving": moving, "models": models}
