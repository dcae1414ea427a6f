"""The input file as lines: plain or gzipped, read in blocks, never whole; a line too long to
hold is measured and read past."""

from __future__ import annotations

import os
import sys
import zlib
from collections.abc import Iterator
from io import BufferedReader
from pathlib import Path
from typing import IO

from pipeline.errors import RunStopped, SettingsError
from pipeline.input.pipe import is_pipe
from pipeline.input.stdin import is_stdin, named

# What reading a plain or gzipped file can raise on bad bytes or a cut-off end.
READ_ERRORS = (OSError, EOFError, zlib.error)


def open_input(path: Path) -> IO[bytes]:
    """Open the input for reading, gzip or plain (a pipe too: nothing is read twice); a
    missing or unreadable file is a settings error."""
    if is_stdin(path):
        return _unzipped(_stdin())
    try:
        if path.is_dir():
            raise SettingsError(f"input {str(path)!r} is a folder; pass a .jsonl or .jsonl.gz file")
        f = path.open("rb")
    except FileNotFoundError:
        raise SettingsError(f"input file {str(path)!r} not found; check --input or the job's input") from None
    except OSError as e:
        raise SettingsError(f"input file {str(path)!r} cannot be read: {e.strerror}") from None
    return _unzipped(f)


NO_STDIN = "--input -: there is no standard input (it is closed)"


def _stdin() -> BufferedReader:
    """Standard input as bytes, on a descriptor of its own (closing it leaves fd 0 open)."""
    if sys.stdin is None:  # (see check_input)
        raise SettingsError(NO_STDIN)
    try:
        return os.fdopen(os.dup(0), "rb")
    except OSError:
        raise SettingsError(NO_STDIN) from None


def _unzipped(f: BufferedReader) -> IO[bytes]:
    if f.peek(2)[:2] != b"\x1f\x8b":
        return f
    import gzip  # (a gzipped input alone needs it)

    unzipped = gzip.GzipFile(fileobj=f, mode="rb")
    unzipped.myfileobj = f  # type: ignore[assignment]  # closed with it
    return unzipped  # type: ignore[return-value]


def check_input(path: Path) -> None:
    """Fail early, as a settings error, on an input that cannot be opened. A pipe is taken
    on trust: opening it here would take the place of the real reader. Standard input must be
    there, and not a terminal (lines typed by hand are not what a run is for)."""
    if is_stdin(path):
        # Closed when Python started (`<&-`), fd 0 is taken by the first file opened after,
        # the event loop's own here: Python then leaves sys.stdin None.
        if sys.stdin is None:
            raise SettingsError(NO_STDIN)
        try:
            os.fstat(0)
        except OSError:
            raise SettingsError(NO_STDIN) from None
        if os.isatty(0):
            raise SettingsError(
                "--input - reads the lines from standard input, which is a terminal here: pipe "
                "them in (psql ... | pipeline run --input - ...) or give a file"
            )
        return
    if is_pipe(path):
        return
    open_input(path).close()


def count_lines(path: Path) -> int | None:
    """Lines in the input, for the progress bar's total; reads in blocks, never whole. None
    for a pipe (it can be read only once) or a file that cannot be read to its end."""
    if is_pipe(path) or not path.is_file():
        return None
    n = 0
    last = b"\n"
    try:
        with open_input(path) as f:
            while block := f.read(1 << 20):
                n += block.count(b"\n")
                last = block[-1:]
    except (*READ_ERRORS, SettingsError):
        return None
    return n + (last != b"\n")


def lines(path: Path, *, max_bytes: int = 1 << 62) -> Iterator[tuple[int, bytes | int]]:
    """Each line with its number; a line longer than `max_bytes` comes as its length instead,
    read past in blocks so that it never sits in memory whole. A file that cannot be read on
    (a .gz cut short, a bad disk) stops the run with what to do; the lines before count."""
    with open_input(path) as f:
        number = 0
        try:
            while raw := f.readline(max_bytes + 1):
                number += 1
                if len(raw) <= max_bytes or raw.endswith(b"\n"):
                    yield number, raw
                    continue
                size = len(raw)
                while (more := f.readline(1 << 20)) and not more.endswith(b"\n"):
                    size += len(more)
                yield number, size + len(more)
        except READ_ERRORS as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise RunStopped(
                f"cannot read {named(path)} after line {number:,} ({reason}); a .gz file cut short? "
                "Repair or replace the file, then run again: the lines before it are kept",
                code="input_unreadable",
            ) from None
