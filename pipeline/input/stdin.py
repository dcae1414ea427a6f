"""`--input -`: the lines come on standard input (`psql ... | pipeline run --input -`), read
once, as a pipe is (`pipeline.input.pipe`).

What a folder remembers of such a job is `-`, not the bytes (they are known only once read,
and sent as they come): a run into it again with `--input -` resumes as one with the same
file would, skipping the lines whose id (their `custom_id`, or a hash of the line's bytes)
is done and sending the rest; fed the same lines, it sends only what is left. A file named
`-` is given by another spelling of its path (`$PWD/-`).
"""

from __future__ import annotations

from pathlib import Path

STDIN = Path("-")
# The same, by its device's names: one job whatever the pipe (its /proc/PID/fd/pipe:[N] path
# is another at every run, and a folder that remembered it could never be resumed).
STDIN_NAMES = ("-", "/dev/stdin", "/dev/fd/0")


def is_stdin(path: Path) -> bool:
    return path == STDIN


def named(path: Path) -> str:
    """The input as messages name it (`<stdin>:12: not JSON`)."""
    return "<stdin>" if path == STDIN else str(path)
