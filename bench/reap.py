"""What a command costs, all of it: `python -m bench.reap REPORT -- CMD...` (issue 14's bench).

The command runs under a reaper: a process that makes itself the child subreaper (prctl
PR_SET_CHILD_SUBREAPER), so every descendant of CMD, even one orphaned or daemonised (Ray's GCS, raylet), ends up waited
for by it or by its own parent; the reaper's getrusage(RUSAGE_CHILDREN) is then the user + sys
of the whole tree, the reaper itself left out. Except the children of a process that ignores
SIGCHLD (Ray's raylet: its workers and actors), which the kernel reaps and counts nowhere: the
reaper samples the tree every 0.1 s with psutil and adds what each of those used when last seen
(short by at most 0.1 s of each).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import orjson
import psutil

from bench.runs import ROOT

LINGER = 30.0  # seconds the reaper waits, once CMD exited, for what it left running
SAMPLE = 0.1  # seconds between the reaper's looks at the process tree
PR_SET_CHILD_SUBREAPER = 36


@dataclass
class Cost:
    """What one reaped command cost: its exit, its wall until it exited, the CPU of its tree."""

    exit: int
    wall: float
    cpu_user: float
    cpu_sys: float
    unreaped: float  # CPU of descendants the kernel reaped, as last sampled
    linger: float  # seconds its descendants ran on after it exited
    leftovers: int  # descendants still running after LINGER, killed by the reaper
    start: float  # epoch seconds: started, exited
    end: float

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_sys + self.unreaped


@dataclass
class Reaped:
    proc: subprocess.Popen[bytes]
    report: Path

    def cost(self) -> Cost:
        self.proc.wait()
        try:
            doc = orjson.loads(self.report.read_bytes())
        except (OSError, orjson.JSONDecodeError):
            now = time.time()
            return Cost(self.proc.returncode, 0.0, 0.0, 0.0, 0.0, 0.0, 0, now, now)
        return Cost(**doc)


def reaped(cmd: list[str], *, report: Path, log: Path, env: dict[str, str]) -> Reaped:
    report.unlink(missing_ok=True)
    wrapper = [sys.executable, "-m", "bench.reap", str(report), "--", *cmd]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            wrapper, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env
        )
    return Reaped(proc, report)


def _ignores_sigchld(pid: int) -> bool:
    """Whether `pid` has SIGCHLD ignored: its children are then reaped by the kernel, and what
    they used is counted nowhere (Ray's raylet does this to its workers)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigIgn:"):
                    return bool(int(line.split()[1], 16) & (1 << (signal.SIGCHLD - 1)))
    except OSError:
        pass
    return False


class _Tree(threading.Thread):
    """Every SAMPLE seconds, each descendant's CPU (its own and its waited children's) and
    whether its parent ignores SIGCHLD: the only figure left of a child the kernel reaps."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.last: dict[int, tuple[float, bool]] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(SAMPLE):
            self.look()

    def look(self) -> None:
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error), p.oneshot():
                    t = p.cpu_times()
                    self.last[p.pid] = (
                        t.user + t.system + t.children_user + t.children_system,
                        _ignores_sigchld(p.ppid()),
                    )


def _reap(report: Path, cmd: list[str]) -> int:
    """Run `cmd` as this process's child, this process its descendants' subreaper; wait for
    all of them, then write what they cost to `report`. Exits as `cmd` did."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")
    tree = _Tree()
    start, started = time.time(), time.monotonic()
    main = subprocess.Popen(cmd)
    tree.start()
    code: int | None = None
    ended = started
    leftovers = 0
    killed = False
    reaped: set[int] = set()
    while True:
        if code is not None and not killed and time.monotonic() - ended > LINGER:
            killed = True
            left = psutil.Process().children(recursive=True)
            leftovers = len(left)
            for p in left:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        try:
            pid, status = os.waitpid(-1, 0 if code is None else os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            time.sleep(0.05)
            continue
        reaped.add(pid)
        if pid == main.pid:
            code = os.waitstatus_to_exitcode(status)
            main.returncode = code
            ended = time.monotonic()
    tree.done.set()
    tree.join()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert code is not None
    doc = {
        "exit": code,
        "wall": ended - started,
        "cpu_user": usage.ru_utime,
        "cpu_sys": usage.ru_stime,
        # reaped by the kernel (parent ignoring SIGCHLD), not by a parent or by this process
        "unreaped": sum(cpu for pid, (cpu, lost) in tree.last.items() if lost and pid not in reaped),
        "linger": time.monotonic() - ended,
        "leftovers": leftovers,
        "start": start,
        "end": start + ended - started,
    }
    report.write_bytes(orjson.dumps(doc))
    return code


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[2] != "--":
        raise SystemExit("usage: python -m bench.reap REPORT -- CMD ...")
    sys.exit(_reap(Path(sys.argv[1]), sys.argv[3:]))
