"""A client's instructions on one input, counted by valgrind's callgrind: a figure that load
moves far less than CPU time (which on this shared machine swings by a third between runs a
minute apart, more than the change a comparison is there to judge). Not at all steady, though:
pipeline does some work once a second (a checkpoint, about a million instructions), which a
run slowed some fifty times by valgrind does fifty times as often, and more on a busy machine;
its count at 10,000 requests moved by up to 150M (2 %) between runs of the same code. Only
where valgrind is installed, and never judged: the CPU-time check stays the one target."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from bench.mock import MockFlags, running_mock
from bench.runs import ROOT, Client

_COLLECTED = re.compile(r"Collected : (\d+)")


def available() -> bool:
    """valgrind is installed, and BENCH_CALLGRIND does not say 0 (a count at 10,000
    requests takes a few minutes a client)."""
    return shutil.which("valgrind") is not None and os.environ.get("BENCH_CALLGRIND", "1") != "0"


def instructions(client: Client, *, input: Path, folder: Path, concurrency: int) -> int | None:
    """The client's instructions (its own process, not its children) on `input` against a
    fresh mock; None when callgrind gave no count (the client failed, valgrind broke)."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    with running_mock(MockFlags(), log=folder / "mock.log") as mock:
        cmd = client.command(input=input, folder=folder, url=mock.url, concurrency=concurrency)
        run = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *cmd],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
        )
    found = _COLLECTED.search(run.stderr)
    return int(found.group(1)) if found and run.returncode in (0, 1) else None
