"""The `pipeline ray` driver killed with SIGKILL at a random moment and run again, 20 times
in a row, then run to its end (issue 20, point 10): no id twice, none lost.

A Ray cluster started once with `ray start --head` (as a KubeRay cluster outlives its
drivers), a mock whose answers take 0.2 to 1 s and fail one time in ten (5xx), and
`--max-attempts 2`, so that some lines end failed and the next run tries them again: their
errors become results from one run to the next, which is where a merge that copies lines
doubles ids. Each run is started as soon as the one before was killed, while the killed
driver's shards may still be ending. Most kills fall at a random moment of the run (its
start, its shards sending, checkpointing); the last ones fall just after the merge has begun,
once the job is done.

Checked after every kill: no shard folder holds a whole result line twice for one id; no
merged file (when there is one) holds an id twice, or as both a result and an error. At the
end: the merged files account for every input line exactly once, and no answer already
written was bought again: the mock's count of answers per request is read after every kill,
and a request whose result a shard held then must have no answer after. Answers bought twice
are shown too: one in flight when its shard is killed is lost with it and bought again, the
price of a kill, not a fault.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from bench.cluster import _env
from bench.inputs import input_file, input_ids
from bench.mock import PIPELINE, MockFlags, running_mock
from bench.report import Check, ScenarioResult
from bench.scenarios import Done, Options
from pipeline.cluster.nodes import PROBE
from pipeline.cluster.shard import MARK
from pipeline.mock.answers import job_key

KILLS = 20
AT_MERGE = 5  # of them, the last ones: just after the merge began
REQUESTS = 10_000
RPM = 6000.0
SHARDS = 4
RUN_WINDOW = (1.0, 12.0)  # seconds after the start: when a kill during the run falls
MERGE_WINDOW = 0.3  # seconds after the merge began: when a kill at the merge falls
RUN_TIMEOUT = 600.0
RAY = str(Path(sys.executable).parent / "ray")


@dataclass
class Kill:
    n: int
    at: float  # seconds after the command started
    phase: str  # "run" or "merge"
    exited_first: int | None  # the command ended before the kill (its exit status)
    shard_twice: int  # ids with two whole result lines in one shard folder, after the kill
    merged_twice: int  # ids twice in the merged files (or both a result and an error)
    written: set[str] = field(default_factory=set)  # ids with a whole result line in a shard
    answers: dict[str, int] = field(default_factory=dict)  # the mock's answers by job key, then


@dataclass
class Outcome:
    kills: list[Kill] = field(default_factory=list)
    final_exit: int | None = None
    results: int = 0
    errors: int = 0
    twice: int = 0
    both: int = 0
    lost: int = 0
    extra: int = 0
    answered_twice: int = 0
    bought_again: int = 0  # written after a kill, answered again later
    attempts: int = 0
    wall: float = 0.0


@contextmanager
def _cluster(env: dict[str, str], log: Path) -> Iterator[str]:
    """A local Ray cluster that outlives each driver, as a KubeRay one does. `ray start
    --block` in a session of its own, ended by ending that session: `ray stop` would end
    every Ray on the machine, other people's included."""
    port = 6400 + random.randrange(500)
    cmd = [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=4", "--include-dashboard=false"]
    with log.open("wb") as out:
        head = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while b"Ray runtime started" not in log.read_bytes():
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed: see {log}")
            time.sleep(0.2)
        yield f"127.0.0.1:{port}"
    finally:
        with suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def _ids(path: Path) -> Iterator[str]:
    """The custom_ids of a JSONL file's whole lines (a killed writer may have torn the last)."""
    if not path.exists():
        return
    with path.open("rb") as f:
        for line in f:
            if line.endswith(b"\n"):
                yield orjson.loads(line)["custom_id"]


def _repeated(counts: Counter[str]) -> int:
    """Ids counted more than once."""
    return sum(1 for c in counts.values() if c > 1)


def _shards(out: Path) -> tuple[int, set[str]]:
    """Ids with two whole result lines in one shard folder, and the ids with one."""
    twice, written = 0, set[str]()
    for folder in out.glob("shard-*-of-*"):
        counts = Counter(_ids(folder / "results.jsonl"))
        twice += _repeated(counts)
        written |= counts.keys()
    return twice, written


def _keys(source: Path) -> dict[str, str]:
    """The mock's key of each input line's request (`job_key`), to its custom_id."""
    keys = {}
    with source.open("rb") as f:
        for line in f:
            body = orjson.loads(line)
            keys[job_key(body)] = body["custom_id"]
    return keys


def _merged(out: Path) -> tuple[Counter[str], Counter[str]]:
    return Counter(_ids(out / "results.jsonl")), Counter(_ids(out / "errors.jsonl"))


def _twice(results: Counter[str], errors: Counter[str]) -> tuple[int, int]:
    """Ids twice in one of the merged files, and ids both a result and an error."""
    return _repeated(results) + _repeated(errors), len(results.keys() & errors.keys())


def _merged_twice(out: Path) -> int:
    return sum(_twice(*_merged(out)))


def _top(out: Path) -> dict[str, float]:
    """OUT's own entries (not the shards' folders) and when each last changed."""
    found = {}
    if out.exists():
        for entry in out.iterdir():
            # Not the shards' folders, nor what the driver writes as it starts: its token
            # (MARK) and the nodes' probes (.pipeline-probe-*).
            if not entry.name.startswith(("shard-", MARK, PROBE)):
                with suppress(FileNotFoundError):
                    found[entry.name] = entry.stat().st_mtime
    return found


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        out.write(f"\n--- {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
        out.flush()
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_at_merge(proc: subprocess.Popen[bytes], out: Path, rng: random.Random) -> tuple[float, bool]:
    """Wait until the driver begins to merge (something in OUT itself appears or changes),
    then kill it a random moment later. Returns when, and whether the merge was seen."""
    before = _top(out)
    started = time.monotonic()
    while proc.poll() is None and time.monotonic() - started < RUN_TIMEOUT:
        if _top(out) != before:
            time.sleep(rng.uniform(0, MERGE_WINDOW))
            return time.monotonic() - started, True
        time.sleep(0.002)  # a harness may poll where the product may not
    return time.monotonic() - started, False


def _run(opts: Options, rng: random.Random) -> Outcome:
    got = Outcome()
    folder = opts.out / "runs" / "killed"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    out = folder / "out"
    n = max(SHARDS * 10, round(REQUESTS * opts.scale))
    source = input_file(opts.out / "inputs", n)
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # Ray's socket paths must stay short
    env = _env(RAY_TMPDIR=ray_tmp)
    began = time.monotonic()
    try:
        flags = MockFlags(latency_ms=200, jitter_ms=800, fail_rate=0.1, rpm=RPM)
        with (
            running_mock(flags, log=folder / "mock.log") as mock,
            _cluster(env, folder / "ray.log") as address,
        ):
            cmd = [PIPELINE, "ray", "--input", str(source), "--output", str(out), "--base-url", mock.url]
            cmd += ["--address", address, "--shards", str(SHARDS), "--rpm", f"{RPM:g}", "--quiet"]
            cmd += ["--max-attempts", "2"]
            log = folder / "runs.log"
            for k in range(1, KILLS + 1):
                proc = _start(cmd, env, log)
                at_merge = k > KILLS - AT_MERGE
                if at_merge:
                    at, seen = _kill_at_merge(proc, out, rng)
                    phase = "merge" if seen else "run (no merge seen)"
                else:
                    wait = rng.uniform(*RUN_WINDOW)
                    with suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=wait)
                    at, phase = wait, "run"
                exited = proc.poll()
                if exited is None:
                    proc.send_signal(signal.SIGKILL)  # the driver alone, as `kill -9 PID`
                proc.wait()
                shard_twice, written = _shards(out)
                answers = mock.stats(jobs=True).get("answered_by_job", {})
                kill = Kill(k, at, phase, exited, shard_twice, _merged_twice(out), written, answers)
                got.kills.append(kill)
                print(
                    f"[bench] killed: kill {k} at {at:.2f} s ({phase})"
                    + (f", but it had ended with {exited}" if exited is not None else "")
                    + f"; ids twice in a shard {kill.shard_twice}, in the merged files {kill.merged_twice}",
                    file=sys.stderr,
                    flush=True,
                )
            proc = _start(cmd, env, log)
            try:
                got.final_exit = proc.wait(timeout=RUN_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            stats = mock.stats(jobs=True)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    got.wall = time.monotonic() - began
    results, errors = _merged(out)
    expected = input_ids(source)
    got.results, got.errors = len(results), len(errors)
    got.twice, got.both = _twice(results, errors)
    got.lost = len(expected - results.keys() - errors.keys())
    got.extra = len((results.keys() | errors.keys()) - expected)
    got.answered_twice = int(stats.get("answered_twice", 0))
    final: dict[str, int] = stats.get("answered_by_job", {})
    ids = _keys(source)
    again = set()
    for kill in got.kills:
        again |= {
            ids[key]
            for key, n in final.items()
            if n > kill.answers.get(key, 0) and ids.get(key) in kill.written
        }
    got.bought_again = len(again)
    got.attempts = sum(stats.get("statuses", {}).values())
    return got


def killed(opts: Options, done: Done) -> ScenarioResult:
    rng = random.Random(20)
    print(f"[bench] killed: pipeline ray --shards {SHARDS}, killed {KILLS} times ...", file=sys.stderr)
    got = _run(opts, rng)
    in_run = [k for k in got.kills if k.phase == "run" and k.exited_first is None]
    at_merge = [k for k in got.kills if k.phase == "merge" and k.exited_first is None]
    kills = len(in_run) + len(at_merge)
    twice_after = sum(k.shard_twice + k.merged_twice for k in got.kills)
    checks = [
        Check(
            "kills that landed (the driver still running)",
            f"{kills} of {KILLS}: {len(in_run)} while the shards ran, {len(at_merge)} at the merge",
            f"{KILLS}",
            kills == KILLS,
        ),
        Check(
            "ids twice after any kill (a shard's results, or the merged files)",
            f"{twice_after:,}",
            "0",
            twice_after == 0,
        ),
        Check(
            "the final run: exit, results, errors",
            f"exit {got.final_exit}, {got.results:,} results, {got.errors:,} errors",
            "0 or 1",
            got.final_exit in (0, 1),
        ),
        Check(
            "ids twice, or a result and an error, at the end",
            f"{got.twice + got.both:,}",
            "0",
            got.twice + got.both == 0,
        ),
        Check("input lines lost (neither a result nor an error)", f"{got.lost:,}", "0", got.lost == 0),
        Check("ids in the output that are not in the input", f"{got.extra:,}", "0", got.extra == 0),
        Check(
            "results written before a kill, answered again after it (bought twice)",
            f"{got.bought_again:,}",
            "0",
            got.bought_again == 0,
        ),
        Check(
            "answers the mock gave twice for one request (in flight when killed: bought again)",
            f"{got.answered_twice:,} of {got.attempts:,} attempts",
        ),
        Check("wall, all runs", f"{got.wall:.0f} s"),
    ]
    title = (
        f"pipeline ray --shards {SHARDS} on a Ray cluster that outlives its drivers, the driver killed "
        f"with SIGKILL {KILLS} times in a row ({AT_MERGE} of them at the merge), each time run again at "
        f"once, then run to its end; mock: answers in 0.2 to 1 s, 10 % 5xx, --max-attempts 2, "
        f"limit {RPM:g}/min"
    )
    notes = [
        f"kill {k.n}: at {k.at:.2f} s, {k.phase}"
        + (f" (it had already ended, exit {k.exited_first})" if k.exited_first is not None else "")
        for k in got.kills
    ]
    return ScenarioResult("killed", title, runs=[], checks=checks, notes=notes)


SCENARIOS = {"killed": killed}
