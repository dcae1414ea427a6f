"""Fault injection at every place pipeline writes, in the manner of SQLite's I/O-error tests.

The functions the package writes through (os.write, os.fsync, os.replace, os.rename,
os.ftruncate, os.open for writing, os.mkdir, os.close, fcntl.flock, a file opened for writing:
write, flush, truncate, close; every call on a SQLite connection) are wrapped. Each call made
from pipeline/ (the mock aside) is counted at its *site*: the operation and the innermost
frames of pipeline/ it was made from. A clean run lists the sites; a test then arms one
(site, n-th call there, fault) and runs the scenario again, so a write added to the package
later is found and failed without a new test.

Faults: an OSError with EIO, one with ENOSPC (a write then goes short first, as a full disk
does), both as SQLite raises them on its own calls; and a cancellation, the run's caller
cancelling it at that very point (the caller's scope is cancelled and CancelledError raised).
A COMMIT may also fail "landed" (`LANDED`): the ledger's own changes are committed, and then
"database or disk is full" is raised all the same, the transaction still open. SQLite does
that when its temporary store (the per-run `seen` ids, in SQLITE_TMPDIR, TMPDIR or /var/tmp)
fills up: a transaction over a WAL database and the temporary one is not atomic across the two.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import fcntl
import io
import os
import sqlite3
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

import pipeline

PACKAGE = str(Path(pipeline.__file__).parent) + os.sep
MOCK = PACKAGE + "mock" + os.sep
DEPTH = 2  # frames of pipeline/ that tell one site from another: the call and its caller
# Helpers every writer of a whole file goes through: their frames are named in a site but do
# not count in its DEPTH, so that each caller of them is a site of its own.
HELPERS = {("output/folder.py", name) for name in ("staged", "write_lines", "atomic_write")}
FAULTS = ("EIO", "ENOSPC", "cancel")
LANDED = {"sqlite COMMIT": ("landed",)}  # faults only some operations have, by operation


def faults(site: Site) -> tuple[str, ...]:
    """The faults a site is failed with in turn."""
    return FAULTS + LANDED.get(site.op, ())


_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


@dataclass(frozen=True, order=True)
class Site:
    op: str
    where: tuple[str, ...]  # "output/appendfile.py:20 append_whole", innermost first

    def __str__(self) -> str:
        return f"{self.op} at {' <- '.join(self.where)}"


_UNSEEN = object()
_MODULES: dict[str, str | None] = {}  # a code's file -> its module in pipeline/, or None
_SITES: dict[tuple[Any, ...], Site] = {}  # (op, module, line, function, module...) -> its Site


def _module(filename: str) -> str | None:
    if not filename.startswith(PACKAGE) or filename.startswith(MOCK):
        return None
    return filename[len(PACKAGE) :]


class Injector:
    """Counts the calls at each site; raises the armed faults at the armed calls."""

    def __init__(self) -> None:
        self.hits: Counter[Site] = Counter()
        self.targets: dict[Site, tuple[int, str]] = {}
        self.fired: set[Site] = set()
        self.cancel: Callable[[], str] | None = None  # the caller's cancel, set per run
        self._short: set[Site] = set()  # an ENOSPC write went short: the next write there fails
        self._lock = threading.Lock()

    def arm(self, *targets: tuple[Site, int, str]) -> None:
        """Fail the nth call at each site with its fault (a second one: a fault met while
        handling the first)."""
        self.targets = {site: (nth, fault) for site, nth, fault in targets}
        self.fired, self._short = set(), set()
        self.hits.clear()

    def disarm(self) -> None:
        self.targets = {}

    def _site(self, op: str) -> Site | None:
        # Called at every write, SQLite call and close of the run (hundreds of thousands in
        # test_write_faults): whose file a frame is of, and each site, is worked out once.
        key: list[Any] = [op]
        frame = sys._getframe(2)
        counted = 0
        while frame is not None and counted < DEPTH:
            code = frame.f_code
            module = _MODULES.get(code.co_filename, _UNSEEN)
            if module is _UNSEEN:
                module = _MODULES[code.co_filename] = _module(code.co_filename)
            if module is not None:
                key += (module, frame.f_lineno, code.co_name)
                counted += (module, code.co_name) not in HELPERS
            frame = frame.f_back
        if len(key) == 1:
            return None
        found = tuple(key)
        site = _SITES.get(found)
        if site is None:
            places = zip(found[1::3], found[2::3], found[3::3], strict=True)
            site = _SITES[found] = Site(op, tuple(f"{m}:{line} {name}" for m, line, name in places))
        return site

    def due(self, op: str, *, short: bool = False) -> str | None:
        """Count this call; the fault to raise now, if it is an armed one. With `short` (a
        write of more than a byte), ENOSPC is first "short": part of the bytes go, as a
        filling disk does, and the next write at the site fails."""
        site = self._site(op)
        if site is None:
            return None
        with self._lock:
            self.hits[site] += 1
            armed = self.targets.get(site)
            if armed is None:
                return None
            nth, fault = armed
            if site in self._short:
                self._short.discard(site)
                return fault
            if site in self.fired or self.hits[site] != nth:
                return None
            self.fired.add(site)
            if fault == "ENOSPC" and short:
                self._short.add(site)
                return "short"
            return fault

    def raise_os(self, fault: str) -> None:
        if fault == "cancel":
            self._cancel()
        code = errno.EIO if fault == "EIO" else errno.ENOSPC
        raise OSError(code, os.strerror(code))

    def raise_sqlite(self, fault: str) -> None:
        if fault == "cancel":
            self._cancel()
        raise sqlite3.OperationalError("disk I/O error" if fault == "EIO" else "database or disk is full")

    def _cancel(self) -> None:
        if self.cancel is None:
            raise asyncio.CancelledError
        # The message is anyio's own, so that the cancelled scope takes the exception as its.
        raise asyncio.CancelledError(self.cancel())


INJECTOR = Injector()


def _os_call(op: str, real: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        fault = INJECTOR.due(op)
        if fault is not None:
            INJECTOR.raise_os(fault)
        return real(*args, **kwargs)

    return call


def _os_write(real: Callable[[int, Any], int]) -> Callable[[int, Any], int]:
    def write(fd: int, data: Any) -> int:
        fault = INJECTOR.due("os.write", short=len(data) > 1)
        if fault == "short":
            return real(fd, memoryview(data)[: len(data) // 2])
        if fault is not None:
            INJECTOR.raise_os(fault)
        return real(fd, data)

    return write


def _os_open(real: Callable[..., int]) -> Callable[..., int]:
    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & _WRITING:
            fault = INJECTOR.due("os.open")
            if fault is not None:
                INJECTOR.raise_os(fault)
        return real(path, flags, *args, **kwargs)

    return open_


def _os_close(real: Callable[[int], None]) -> Callable[[int], None]:
    def close(fd: int) -> None:
        fault = INJECTOR.due("os.close")
        real(fd)  # Linux closes the descriptor even when close reports an error
        if fault is not None:
            INJECTOR.raise_os(fault)

    return close


class FaultyFile:
    """A file opened for writing, its writes counted and failed at will."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw

    def __getattr__(self, name: str) -> Any:
        return getattr(self._raw, name)

    def __enter__(self) -> FaultyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Any]:
        return iter(self._raw)

    def write(self, data: Any) -> int:
        fault = INJECTOR.due("file.write")
        if fault is not None:
            INJECTOR.raise_os(fault)
        return int(self._raw.write(data))

    def flush(self) -> None:
        fault = INJECTOR.due("file.flush")
        if fault is not None:
            INJECTOR.raise_os(fault)
        self._raw.flush()

    def truncate(self, size: int | None = None) -> int:
        fault = INJECTOR.due("file.truncate")
        if fault is not None:
            INJECTOR.raise_os(fault)
        return int(self._raw.truncate(size))

    def close(self) -> None:
        if self._raw.closed:
            return
        fault = INJECTOR.due("file.close")
        self._raw.close()  # closed whatever close reports
        if fault is not None:
            INJECTOR.raise_os(fault)


def _io_open(real: Callable[..., Any]) -> Callable[..., Any]:
    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        writing = any(c in mode for c in "wax+")
        if writing:
            fault = INJECTOR.due("open")
            if fault is not None:
                INJECTOR.raise_os(fault)
        raw = real(file, mode, *args, **kwargs)
        return FaultyFile(raw) if writing else raw

    return open_


def _verb(sql: str) -> str:
    return "sqlite " + (sql.split(None, 1) or ["?"])[0].upper()


class FaultyConnection(sqlite3.Connection):
    """Every call on the ledger's connection is a site; COMMIT failing for EIO rolls the
    transaction back first, as SQLite does after an I/O error."""

    def _due(self, sql: str) -> None:
        verb = _verb(sql)
        fault = INJECTOR.due(verb)
        if fault is None:
            return
        if verb == "sqlite COMMIT" and fault == "EIO" and self.in_transaction:
            super().execute("ROLLBACK")
        if fault == "landed":
            super().execute("COMMIT")  # the database's own part is committed...
            super().execute("BEGIN")  # ...the temporary store's is not, and stays open
            fault = "ENOSPC"
        INJECTOR.raise_sqlite(fault)

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        self._due(sql)
        if sql.startswith("PRAGMA synchronous"):
            sql = "PRAGMA synchronous=OFF"  # SQLite's own syncs too: no power loss here
        return super().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        self._due(sql)
        return super().executemany(sql, parameters)

    def executescript(self, script: str, /) -> sqlite3.Cursor:
        self._due(script)
        return super().executescript(script)

    def commit(self) -> None:
        self._due("COMMIT")
        super().commit()

    def close(self) -> None:
        fault = INJECTOR.due("sqlite close")
        super().close()
        if fault is not None:
            INJECTOR.raise_sqlite(fault)


def cancelling(scope: anyio.CancelScope) -> Callable[[], str]:
    """`scope.cancel`, callable from a worker thread too (an fsync runs in one); returns the
    message of the CancelledError that anyio raises for that scope."""
    loop, home = asyncio.get_running_loop(), threading.get_ident()

    def cancel() -> str:
        if threading.get_ident() == home:
            scope.cancel()
        else:
            loop.call_soon_threadsafe(scope.cancel)
        return f"Cancelled via cancel scope {id(scope):x}"

    return cancel


@contextlib.contextmanager
def installed() -> Iterator[Injector]:
    """Wrap the writing functions for the duration (nothing armed: they only count)."""
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs.setdefault("factory", FaultyConnection)
        return real_connect(*args, **kwargs)

    patches: list[tuple[Any, str, Any]] = [
        (os, "write", _os_write(os.write)),
        (os, "open", _os_open(os.open)),
        (os, "close", _os_close(os.close)),
        (io, "open", _io_open(io.open)),
        (builtins, "open", _io_open(builtins.open)),
        (sqlite3, "connect", connect),
    ]
    for name in ("ftruncate", "truncate", "replace", "rename", "mkdir", "unlink"):
        patches.append((os, name, _os_call(f"os.{name}", getattr(os, name))))
    # Power loss is not what this tests: a sync counts as a site, and is skipped for speed.
    for name in ("fsync", "fdatasync"):
        patches.append((os, name, _os_call(f"os.{name}", lambda fd: None)))
    patches.append((fcntl, "flock", _os_call("fcntl.flock", fcntl.flock)))
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    INJECTOR.disarm()
    INJECTOR.hits.clear()
    try:
        yield INJECTOR
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
        INJECTOR.disarm()
        INJECTOR.cancel = None
