"""One client run: a fresh mock, the client in its own measured process, then the figures
(what the client got back, what the mock counted)."""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import orjson

from bench.inputs import answered_ids, input_ids
from bench.measure import Measurement, StopWhen, measure
from bench.mock import PIPELINE, MockFlags, running_mock

ROOT = Path(__file__).resolve().parent.parent
Kind = Literal["bare", "naive", "pipeline"]


@dataclass(frozen=True, kw_only=True)
class Client:
    name: str  # as the table shows it
    kind: Kind
    rpm: float | None = None  # given to pipeline
    tpm: float | None = None
    flags: tuple[str, ...] = ()  # more of pipeline's flags
    # pipeline run through bench.batchtrace, its batch tier's steps timed into FOLDER/trace.jsonl
    traced: bool = False

    def command(self, *, input: Path, folder: Path, url: str, concurrency: int) -> list[str]:
        common = ["--input", str(input), "--base-url", url, "--concurrency", str(concurrency)]
        if self.kind == "bare":
            return [sys.executable, "-m", "bench.clients.bare", *common]
        if self.kind == "naive":
            return [sys.executable, "-m", "bench.clients.naive", *common, "--output", str(results(folder))]
        limits = (["--rpm", f"{self.rpm:g}"] if self.rpm else []) + (
            ["--tpm", f"{self.tpm:g}"] if self.tpm else []
        )
        entry = [sys.executable, "-m", "bench.batchtrace", str(trace(folder))] if self.traced else [PIPELINE]
        return [*entry, "run", *common, "--output", str(folder / "output"), *limits, *self.flags, "--quiet"]


BARE = Client(name="bare aiohttp", kind="bare")
NAIVE = Client(name="naive openai", kind="naive")
PIPELINE_RUN = Client(name="pipeline", kind="pipeline")


def results(folder: Path) -> Path:
    return folder / "results.jsonl"


def trace(folder: Path) -> Path:
    return folder / "trace.jsonl"


@dataclass
class ClientRun:
    client: Client
    requests: int  # lines in the input
    measurement: Measurement
    mock: dict[str, Any]  # GET /mock/stats once the client exited
    mock_cpu: float
    succeeded: int  # ids with a real completion
    lost: int  # ids in the input without one
    bad_kept: int  # result lines holding no completion (an error in a 200, a malformed body)
    listen_overflows: int | None  # SYNs the kernel dropped at a full accept queue (machine-wide)
    crash: str | None = None  # the last line on stderr, when the client exited with an error
    startup_cpu: float | None = None  # the same client's CPU on an empty input, when measured
    said: dict[str, Any] = field(default_factory=dict)  # the client's own summary line
    events: list[dict[str, Any]] = field(default_factory=list)  # JSON lines on its stderr

    @property
    def cpu_ms_per_request(self) -> float:
        return 1000 * self.measurement.cpu / max(self.requests, 1)

    @property
    def net_cpu_ms_per_request(self) -> float | None:
        """CPU per request without the start-up and shut-down an empty input costs."""
        if self.startup_cpu is None:
            return None
        return 1000 * (self.measurement.cpu - self.startup_cpu) / max(self.requests, 1)

    @property
    def share_429(self) -> float:
        statuses: dict[str, int] = self.mock.get("statuses", {})
        return statuses.get("429", 0) / max(sum(statuses.values()), 1)

    def steady_rate(self) -> float | None:
        """Accepted requests a second over the whole seconds between the first and the last
        (both partial, so left out); seconds with none accepted count as 0."""
        per_second = {int(k): v for k, v in self.mock.get("accepted_per_second", {}).items()}
        if len(per_second) < 3:
            return None
        first, last = min(per_second) + 1, max(per_second) - 1
        return float(statistics.mean(per_second.get(s, 0) for s in range(first, last + 1)))

    def figures(self) -> dict[str, Any]:
        m = self.measurement
        steady_min, steady_median, steady_max = m.steady()
        return {
            "client": self.client.name,
            "kind": self.client.kind,
            "rpm_given": self.client.rpm,
            "tpm_given": self.client.tpm,
            "requests": self.requests,
            "exit_code": m.exit_code,
            "killed": m.killed,
            "wall_seconds": round(m.wall, 3),
            "cpu_seconds": round(m.cpu, 3),
            "cpu_user_seconds": round(m.cpu_user, 3),
            "cpu_sys_seconds": round(m.cpu_sys, 3),
            "cpu_ms_per_request": round(self.cpu_ms_per_request, 4),
            "startup_cpu_seconds": self.startup_cpu,
            "net_cpu_ms_per_request": self.net_cpu_ms_per_request,
            "listen_overflows": self.listen_overflows,
            "peak_rss_mb": round(m.peak_rss_mb, 1),
            "ru_maxrss_mb": round(m.maxrss_mb, 1),
            "rss_steady_mb": {
                "min": round(steady_min, 1),
                "median": round(steady_median, 1),
                "max": round(steady_max, 1),
            },
            "rss_timeline_mb": [[round(t, 2), round(mb, 1)] for t, mb in m.timeline(12)],
            "succeeded": self.succeeded,
            "lost": self.lost,
            "bad_results_kept": self.bad_kept,
            "share_429": round(self.share_429, 5),
            "steady_accepted_per_second": self.steady_rate(),
            "mock": self.mock,
            "mock_cpu_seconds": round(self.mock_cpu, 3),
            "client_summary": self.said,
            "client_events": self.events,
            "crash": self.crash,
        }


def _listen_overflows() -> int | None:
    """TcpExtListenOverflows: a client opening more connections at once than the mock's accept
    queue holds gets SYNs dropped, and waits a second for the retransmit."""
    try:
        rows = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()]
    except OSError:
        return None
    for names, values in zip(rows[::2], rows[1::2], strict=False):
        if names and names[0] == "TcpExt:" and "ListenOverflows" in names:
            return int(values[names.index("ListenOverflows")])
    return None


@cache
def _ids(path: Path) -> frozenset[str]:
    return frozenset(input_ids(path))


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_bytes().splitlines():
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def run_client(
    client: Client,
    *,
    input: Path,
    flags: MockFlags,
    folder: Path,
    concurrency: int,
    stop_when: StopWhen | None = None,
    keep_results: bool = True,
) -> ClientRun:
    """Run `client` on `input` against a fresh mock; its files go to `folder` (emptied first)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    wanted = _ids(input)
    with running_mock(flags, log=folder / "mock.log") as mock:
        cmd = client.command(input=input, folder=folder, url=mock.url, concurrency=concurrency)
        (folder / "command.txt").write_text(" ".join(cmd) + "\n")
        overflows = _listen_overflows()
        m = measure(
            cmd, stdout=folder / "stdout.log", stderr=folder / "stderr.log", cwd=ROOT, stop_when=stop_when
        )
        after = _listen_overflows()
        stats = mock.stats()
        mock_cpu = mock.cpu_seconds()
    said = next(iter(_json_lines(folder / "stdout.log")), {}) if client.kind != "pipeline" else {}
    events = [e for e in _json_lines(folder / "stderr.log") if "event" in e]
    last = [line for line in (folder / "stderr.log").read_text(errors="replace").splitlines() if line.strip()]
    crash = last[-1].strip() if last and m.exit_code not in (0, 1) and not m.killed else None
    if client.kind == "bare":
        succeeded, bad = int(said.get("succeeded", 0)), 0
        lost = len(wanted) - succeeded
    else:
        path = results(folder / "output") if client.kind == "pipeline" else results(folder)
        got, bad = answered_ids(path)
        succeeded, lost = len(got & wanted), len(wanted - got)
        if client.kind == "pipeline":
            usage = folder / "output" / "usage.json"
            if usage.exists():
                doc = orjson.loads(usage.read_bytes())
                said = {"runs": doc.get("runs", [])[-1:], "requests": doc.get("requests")}
        page = folder / "output" / "report.html"
        if page.exists():  # how big the run's report.html is, and how long it takes to draw again
            said["report_html_bytes"] = page.stat().st_size
            began = time.perf_counter()
            subprocess.run([PIPELINE, "report", str(folder / "output")], capture_output=True, check=False)
            said["report_seconds"] = time.perf_counter() - began
        if not keep_results:  # the memory scenario's outputs run to gigabytes
            shutil.rmtree(folder / "output", ignore_errors=True)
            path.unlink(missing_ok=True)
    return ClientRun(
        client=client,
        requests=len(wanted),
        measurement=m,
        mock=stats,
        mock_cpu=mock_cpu,
        succeeded=succeeded,
        lost=lost,
        bad_kept=bad,
        crash=crash,
        listen_overflows=None if overflows is None or after is None else after - overflows,
        said=said,
        events=events,
    )
