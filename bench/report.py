"""What a scenario found: one table per scenario, the ratios and the targets beside them, and
every figure in bench/out/results.json."""

from __future__ import annotations

import datetime as dt
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from bench.runs import ClientRun


@dataclass(frozen=True)
class Check:
    label: str
    value: str
    target: str | None = None  # None: a figure shown for comparison, no target
    ok: bool | None = None

    def line(self) -> str:
        if self.target is None:
            return f"  {self.label}: {self.value}"
        verdict = "ok" if self.ok else "MISSED"
        return f"  {self.label}: {self.value}   [target {self.target}: {verdict}]"

    def figures(self) -> dict[str, Any]:
        return {"label": self.label, "value": self.value, "target": self.target, "ok": self.ok}


@dataclass
class ScenarioResult:
    name: str
    title: str
    runs: list[ClientRun]
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    limit_per_second: float | None = None  # requests a second the mock allows, for the % columns
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    # the same per run (by client name) where runs met different limits; a run in neither has no %
    run_limits: dict[str, float] = field(default_factory=dict)

    def run(self, name: str) -> ClientRun:
        return next(r for r in self.runs if r.client.name == name)

    def limit_of(self, run: ClientRun) -> float | None:
        return self.run_limits.get(run.client.name, self.limit_per_second)

    def figures(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "limit_requests_per_second": self.limit_per_second,
            "run_limits_requests_per_second": self.run_limits,
            "load_average_before": self.load_before,
            "checks": [c.figures() for c in self.checks],
            "notes": self.notes,
            "runs": [r.figures() for r in self.runs],
        }


Column = tuple[str, Callable[[ClientRun], str]]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _share(value: float, limit: float | None) -> str:
    return "-" if not limit else _pct(value / limit)


def _columns(result: ScenarioResult) -> list[Column]:
    columns: list[Column] = [
        ("client", lambda r: r.client.name + (" (killed)" if r.measurement.killed else "")),
        ("exit", lambda r: str(r.measurement.exit_code)),
        ("wall s", lambda r: f"{r.measurement.wall:.2f}"),
        ("CPU s", lambda r: f"{r.measurement.cpu:.2f}"),
        ("CPU ms/req", lambda r: f"{r.cpu_ms_per_request:.3f}"),
        (
            "net ms/req",
            lambda r: "-" if r.net_cpu_ms_per_request is None else f"{r.net_cpu_ms_per_request:.3f}",
        ),
        ("peak RSS MB", lambda r: f"{r.measurement.peak_rss_mb:.1f}"),
        ("ru_maxrss MB", lambda r: f"{r.measurement.maxrss_mb:.1f}"),
        ("succeeded", lambda r: f"{r.succeeded:,}"),
        ("lost", lambda r: f"{r.lost:,}"),
        ("bad kept", lambda r: f"{r.bad_kept:,}"),
        ("429s", lambda r: _pct(r.share_429)),
        ("paid twice", lambda r: f"{r.mock.get('answered_twice', 0):,}"),
        ("SYN drops", lambda r: "-" if r.listen_overflows is None else f"{r.listen_overflows:,}"),
    ]
    if result.limit_per_second or result.run_limits:
        limit = result.limit_of
        columns += [
            ("steady req/s", lambda r: f"{r.steady_rate() or 0:.1f}"),
            ("% of limit", lambda r: _share(r.steady_rate() or 0, limit(r))),
            ("overall req/s", lambda r: f"{r.succeeded / max(r.measurement.wall, 1e-9):.1f}"),
            ("overall %", lambda r: _share(r.succeeded / max(r.measurement.wall, 1e-9), limit(r))),
        ]
    return columns


def table(result: ScenarioResult) -> str:
    columns = _columns(result)
    rows = [[header for header, _ in columns]] + [[cell(r) for _, cell in columns] for r in result.runs]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for n, row in enumerate(rows):
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def show(result: ScenarioResult) -> None:
    load = ", ".join(f"{x:.2f}" for x in result.load_before)
    print(f"\n== {result.name}: {result.title}  (load average before: {load})", flush=True)
    print(table(result))
    for check in result.checks:
        print(check.line())
    for note in result.notes:
        print(f"  {note}")
    for r in result.runs:
        if r.crash:
            print(f"  {r.client.name} exited {r.measurement.exit_code}: {r.crash}")
    dropped = [r.client.name for r in result.runs if r.listen_overflows]
    if dropped:
        print(
            f"  SYN drops ({', '.join(dropped)}): connections refused at the mock's full accept queue"
            " (aiohttp's default backlog is 128); each costs the client about 1 s of wall until the"
            " retransmit. The counter is machine-wide."
        )
    print(flush=True)


def write_json(
    path: Path, *, started: dt.datetime, options: dict[str, Any], results: list[ScenarioResult]
) -> None:
    doc = {
        "started": started.isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "options": options,
        "scenarios": {r.name: r.figures() for r in results},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_NON_STR_KEYS))
    tmp.replace(path)
