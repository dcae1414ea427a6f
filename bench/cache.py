"""Answers reused (issue 23, points 2 and 4): the same job run twice with one answer cache
(`--cache DIR`), each run into a folder of its own, against a mock on one port (the cache keys
answers by the endpoint's URL). Judged: the second run sends nothing, writes every line marked
reused, says what it did not spend, and takes under 5 % of the first run's wall time. The
mock answers in 1 s, as a short completion takes a model."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import orjson

from bench.inputs import input_file
from bench.mock import MockFlags
from bench.report import Check, ScenarioResult
from bench.runs import Client, ClientRun
from bench.scenarios import Done, Options, _lost_check, _run, _slug

LINES = 10_000
LATENCY_MS = 1_000.0
WALL_SHARE = 0.05  # the second run's wall, at most, of the first's


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reused(run: ClientRun, out: Path) -> tuple[int, int, float, float]:
    """Result lines marked reused, all result lines, the dollars usage.json says were not
    spent, and those it says were paid."""
    folder = out / "runs" / "cache" / _slug(run.client) / "output"
    marked = lines = 0
    with (folder / "results.jsonl").open("rb") as f:
        for line in f:
            lines += 1
            marked += b'"reused":true' in line
    usage = orjson.loads((folder / "usage.json").read_bytes())
    reused = usage.get("reused", {}).get("cost_not_spent", 0.0)
    return marked, lines, float(reused), float(usage["cost"]["total"] or 0.0)


def cache(opts: Options, done: Done) -> ScenarioResult:
    load = os.getloadavg()
    lines = max(int(LINES * opts.scale), 100)
    path = input_file(opts.out / "inputs", lines)
    folder = opts.out / "runs" / "cache" / "answers"
    shutil.rmtree(folder, ignore_errors=True)
    flags = MockFlags(latency_ms=LATENCY_MS, port=_free_port())
    first, second = (
        _run("cache", opts, Client(name=name, kind="pipeline", flags=("--cache", str(folder))), path, flags)
        for name in ("pipeline first run", "pipeline second run")
    )
    sent = [int(run.mock.get("statuses", {}).get("200", 0)) for run in (first, second)]
    _, _, _, paid = _reused(first, opts.out)
    marked, kept, saved, paid_again = _reused(second, opts.out)
    share = second.measurement.wall / first.measurement.wall
    checks = [
        Check("requests the first run sent / lines", f"{sent[0]:,} / {lines:,}", "equal", sent[0] == lines),
        Check("requests the second run sent", f"{sent[1]:,}", "0", sent[1] == 0),
        Check(
            "second run's results marked reused / written",
            f"{marked:,} / {kept:,}",
            "all",
            marked == kept == lines,
        ),
        Check(
            "dollars the second run did not spend / the first paid",
            f"${saved:.4f} / ${paid:.4f}",
            "equal",
            abs(saved - paid) < 1e-6,
        ),
        Check("dollars the second run paid", f"${paid_again:.4f}", "0", paid_again == 0),
        Check(
            "second run's wall / first run's",
            f"{second.measurement.wall:.2f} s / {first.measurement.wall:.2f} s ({share:.1%})",
            f"< {WALL_SHARE:.0%}",
            share < WALL_SHARE,
        ),
        _lost_check(first),
        _lost_check(second),
    ]
    title = (
        f"{lines:,} lines run twice with one --cache DIR, each into its own folder; mock: {flags.describe()}"
    )
    notes = ["the cache keys an answer by the endpoint's URL too: both runs meet a mock on the same port"]
    return ScenarioResult("cache", title, runs=[first, second], checks=checks, notes=notes, load_before=load)


SCENARIOS = {"cache": cache}
