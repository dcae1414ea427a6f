"""One client process, measured from outside: wall time, CPU (user + sys from os.wait4, so
the client's own and nothing else's), and RSS sampled with psutil every 50 ms plus the
kernel's ru_maxrss."""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil

MB = 1024 * 1024
INTERVAL = 0.05

Samples = list[tuple[float, float]]  # (seconds since start, RSS in MB)
StopWhen = Callable[[Samples], bool]


@dataclass
class Measurement:
    exit_code: int
    wall: float
    cpu_user: float
    cpu_sys: float
    peak_rss_mb: float  # the highest 50 ms sample
    # ru_maxrss, the kernel's high-water mark; on Linux it includes the forking parent's
    # memory at exec time, so it is shown but not judged
    maxrss_mb: float
    killed: bool  # stopped by the harness (see `stop_when`)
    samples: Samples = field(repr=False)

    @property
    def cpu(self) -> float:
        return self.cpu_user + self.cpu_sys

    def steady(self, skip: float = 0.1) -> tuple[float, float, float]:
        """Min, median and max RSS after the first `skip` of the run (start-up)."""
        cut = self.wall * skip
        rss = [mb for t, mb in self.samples if t >= cut] or [mb for _, mb in self.samples] or [0.0]
        return min(rss), statistics.median(rss), max(rss)

    def timeline(self, points: int = 6) -> list[tuple[float, float]]:
        """A few samples spread evenly over the run."""
        if not self.samples:
            return []
        step = max(len(self.samples) // points, 1)
        picked = self.samples[::step]
        if picked[-1] != self.samples[-1]:
            picked.append(self.samples[-1])
        return picked


def plateau(*, settle: float = 3.0, cap: float = 60.0, growth: float = 0.01) -> StopWhen:
    """Stop when RSS has grown less than `growth` over the last `settle` seconds, or at `cap`."""

    def stop(samples: Samples) -> bool:
        if not samples:
            return False
        now = samples[-1][0]
        if now >= cap:
            return True
        if now < 2 * settle:
            return False
        before = max(mb for t, mb in samples if t < now - settle)
        return samples[-1][1] <= before * (1 + growth) and before > 0

    return stop


def measure(
    cmd: Sequence[str],
    *,
    stdout: Path,
    stderr: Path,
    cwd: Path | None = None,
    stop_when: StopWhen | None = None,
) -> Measurement:
    with stdout.open("wb") as out, stderr.open("wb") as err:
        started = time.perf_counter()
        process = subprocess.Popen(list(cmd), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        done = threading.Event()
        ended: dict[str, float] = {}
        usage: list[resource.struct_rusage] = []

        def reap() -> None:
            # Blocking wait4 gives the exact exit time and this child's own rusage.
            _, status, rusage = os.wait4(process.pid, 0)
            ended["at"] = time.perf_counter()
            process.returncode = os.waitstatus_to_exitcode(status)
            usage.append(rusage)
            done.set()

        reaper = threading.Thread(target=reap, daemon=True)
        reaper.start()
        try:
            proc: psutil.Process | None = psutil.Process(process.pid)
        except psutil.Error:  # already gone
            proc = None
        samples: Samples = []
        killed = False
        while proc is not None and not done.wait(INTERVAL):
            try:
                rss = proc.memory_info().rss / MB
            except psutil.Error:
                continue
            if rss > 0:
                samples.append((time.perf_counter() - started, rss))
            if not killed and stop_when is not None and stop_when(samples):
                killed = True
                # psutil checks the pid still names our child before it signals.
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        reaper.join()
    ru = usage[0]
    return Measurement(
        exit_code=process.returncode,
        wall=ended["at"] - started,
        cpu_user=ru.ru_utime,
        cpu_sys=ru.ru_stime,
        peak_rss_mb=max((mb for _, mb in samples), default=0.0),
        maxrss_mb=ru.ru_maxrss / 1024,  # KiB on Linux
        killed=killed,
        samples=samples,
    )
