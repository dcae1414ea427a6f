"""An output file appended to in whole lines only: a write that fails part way (a full disk)
is cut back to the last whole line, and where even that fails the file is marked torn and
written no more, so that the next run's repair finds every line it holds whole or cuts it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def append_whole(fd: int, data: bytes, size: int) -> int:
    """Append all of `data` to a file of `size` bytes; returns the new size. If the write
    fails part way (a full disk), the file is cut back to `size` so no torn line stays."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise
    return size + len(data)


class AppendFile:
    """An output file appended to: its descriptor, and the size its whole lines end at."""

    def __init__(self, path: Path) -> None:
        self.fd = _open_append(path)
        try:
            self.size = os.fstat(self.fd).st_size
        except BaseException:
            os.close(self.fd)
            raise
        self.torn = False  # a failed append left bytes it could not cut: append no more
        self.kept = 0  # after an append that failed: its whole lines the file holds all the same

    def append(self, data: bytes) -> None:
        """Append whole lines; raises if they could not all go, `kept` then saying how many
        of them the file holds (the cut back failed too: the next run keeps them)."""
        self.kept = 0
        if self.torn:
            raise OSError(f"a failed write left bytes that could not be cut from descriptor {self.fd}")
        try:
            self.size = append_whole(self.fd, data, self.size)
        except OSError:
            try:
                now = os.fstat(self.fd).st_size
            except OSError:
                self.torn = True  # how much went in is not known: none of it is counted
                raise
            if now != self.size:
                self.torn = True
                whole = data[: max(now - self.size, 0)].rfind(b"\n") + 1
                self.kept = data[:whole].count(b"\n")
                self.size += whole  # the torn rest is past it, for the next run to cut
            raise

    def close(self) -> None:
        fd, self.fd, self.torn = self.fd, -1, True
        if fd >= 0:
            os.close(fd)
