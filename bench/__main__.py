"""`python -m bench [SCENARIO ...]` (or `make bench SCENARIOS=a,b BENCH_ARGS=...`): run the
scenarios in turn, print a table for each, write every figure to bench/out/results.json."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench import batches, cache, caption, cluster, killed, prefix, real, redo, scenarios, shards, styles
from bench.report import ScenarioResult, show, write_json
from bench.runs import ROOT
from bench.scenarios import Options, Scenario

OUT = Path(__file__).resolve().parent / "out"
# The canonical order (a scenario may compare itself with one run before it).
SCENARIOS: dict[str, Scenario] = {
    **scenarios.SCENARIOS,
    **real.SCENARIOS,
    **styles.SCENARIOS,
    **caption.SCENARIOS,
    **shards.SCENARIOS,
    **cluster.SCENARIOS,
    **killed.SCENARIOS,
    **batches.SCENARIOS,
    **prefix.SCENARIOS,
    **cache.SCENARIOS,
    **redo.SCENARIOS,
}


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name) or default)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark pipeline against a bare aiohttp loop and a naive openai-SDK client.",
        epilog="Counts default to the environment variables BENCH_REQUESTS, BENCH_RATE_REQUESTS and "
        "BENCH_LINES when set.",
    )
    p.add_argument(
        "scenarios",
        nargs="*",
        help=f"any of {', '.join(SCENARIOS)} (space- or comma-separated); all when none is named",
    )
    p.add_argument(
        "--requests", type=int, default=_env_int("BENCH_REQUESTS", 10_000), help="clean, latency, faults"
    )
    p.add_argument(
        "--long-requests",
        type=int,
        default=_env_int("BENCH_LONG_REQUESTS", 100_000),
        help="faults: the long pair of pipeline runs (0 skips it)",
    )
    p.add_argument(
        "--rate-requests", type=int, default=_env_int("BENCH_RATE_REQUESTS", 3_000), help="rpm, tpm"
    )
    p.add_argument("--lines", type=int, default=_env_int("BENCH_LINES", 1_000_000), help="memory")
    p.add_argument("--concurrency", type=int, default=256)
    p.add_argument(
        "--naive-cap", type=float, default=60.0, help="seconds the naive client may spend on the memory input"
    )
    p.add_argument(
        "--scale",
        type=float,
        default=1.0,
        help=f"multiply the request counts of {', '.join([*real.SCENARIOS, 'styles', 'models', 'batches', 'prefix', 'cache', 'redo'])}"
        " (0.1: a quick look; default 1)",
    )
    p.add_argument(
        "--out", type=Path, default=OUT, help="inputs, client outputs and results.json (default bench/out)"
    )
    return p


def _code_state() -> dict[str, Any]:
    """Which pipeline was measured: the commit, and the files under pipeline/ changed since."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
        return done.stdout.rstrip()

    changed = [line[3:] for line in git("status", "--porcelain", "--", "pipeline").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD") or None, "uncommitted": changed}


def _selected(names: list[str]) -> list[str]:
    picked = [n for name in names for n in name.replace(",", " ").split()]
    unknown = [n for n in picked if n not in SCENARIOS]
    if unknown:
        raise SystemExit(
            f"bench: unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}"
        )
    # Run in the canonical order, so that a scenario finds the ones it compares itself with.
    return [n for n in SCENARIOS if n in picked] if picked else list(SCENARIOS)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = _selected(args.scenarios)
    opts = Options(
        out=args.out.resolve(),
        requests=args.requests,
        long_requests=args.long_requests,
        rate_requests=args.rate_requests,
        lines=args.lines,
        concurrency=args.concurrency,
        naive_cap=args.naive_cap,
        scale=args.scale,
    )
    started = dt.datetime.now(dt.UTC)
    code = _code_state()
    dirty = f", uncommitted changes in {', '.join(code['uncommitted'])}" if code["uncommitted"] else ""
    print(f"Measuring pipeline at commit {code['commit']}{dirty}", flush=True)
    options = {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(opts).items()}
    done: dict[str, ScenarioResult] = {}
    results_path = opts.out / "results.json"
    for name in names:
        result = SCENARIOS[name](opts, done)
        done[name] = result
        show(result)
        write_json(
            results_path,
            started=started,
            options=options | {"scenarios": names, "pipeline": code},
            results=list(done.values()),
        )
    missed = [f"{r.name}: {c.label}" for r in done.values() for c in r.checks if c.ok is False]
    print(f"All figures: {results_path}")
    print(f"Targets missed: {len(missed)}" + "".join(f"\n  {m}" for m in missed), file=sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
