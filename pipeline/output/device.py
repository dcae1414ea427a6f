"""What to tell a person when the output folder cannot be written: which folder, which
device (the filesystem and where it is mounted, from /proc/self/mountinfo), how much room is
left, what was kept, and what to do. A full disk or a failing one is a stop, not a bug.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
from pathlib import Path
from typing import NamedTuple

# flock(2) on a filesystem that gives no locks: some NFS and FUSE mounts.
NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class Mount(NamedTuple):  # (as a frozen dataclass, 2.7 million instructions more of every start)
    point: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in octal (\\040...)."""
    for code in ("040", "011", "012", "134"):
        field = field.replace("\\" + code, chr(int(code, 8)))
    return field


def _existing(path: Path) -> Path:
    """`path`, or the nearest folder above it that exists (a folder not made yet is on its)."""
    for candidate in (path, *path.absolute().parents):
        if candidate.exists():
            return candidate
    return path


def mount_of(path: Path) -> Mount | None:
    """The mount `path` lives on, or None where that cannot be told (not Linux)."""
    path = _existing(path)
    try:
        dev = os.stat(path).st_dev
        real = os.path.realpath(path)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            rows = f.read().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(dev)}:{os.minor(dev)}"
    best: Mount | None = None
    for row in rows:
        fields = row.split(" ")
        if len(fields) < 10 or fields[2] != wanted or "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        point = _unescape(fields[4])
        inside = real == point or real.startswith(point.rstrip("/") + "/")
        if inside and (best is None or len(point) > len(best.point)):
            best = Mount(point, fields[dash + 1], _unescape(fields[dash + 2]))
    return best


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def device(path: Path) -> str:
    """'tmpfs mounted at /mnt/x, 12.0 KiB of 1.0 MiB free', or as much of it as is known."""
    mount = mount_of(path)
    where = "an unknown device" if mount is None else f"{mount.fstype} mounted at {mount.point}"
    if mount is not None and mount.source not in ("none", mount.fstype, ""):
        where += f" ({mount.source})"
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(_existing(path))
        where += f", {_size(usage.free)} of {_size(usage.total)} free"
    return where


def is_full(error: BaseException) -> bool:
    if isinstance(error, OSError):
        return error.errno in _FULL
    return isinstance(error, sqlite3.Error) and "full" in str(error)


def reason(error: BaseException) -> str:
    if isinstance(error, OSError):
        return error.strerror or str(error)
    return str(error) or type(error).__name__


def sqlite_temp_folder() -> Path | None:
    """Where SQLite keeps its temporary files (a run's `seen` ids, big sorts): the first of
    SQLITE_TMPDIR, TMPDIR, /var/tmp, /usr/tmp, /tmp and the working folder that is a folder
    it may write to, as its Unix VFS picks it (it reads the two variables as it starts)."""
    for candidate in (
        os.environ.get("SQLITE_TMPDIR"),
        os.environ.get("TMPDIR"),
        "/var/tmp",
        "/usr/tmp",
        "/tmp",
        ".",
    ):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return Path(candidate)
    return None


def _temp_elsewhere(folder: Path, error: BaseException) -> Path | None:
    """SQLite's temporary folder, when SQLite says a disk is full and that folder is on
    another device than `folder`: the full one may be either."""
    if not (isinstance(error, sqlite3.Error) and is_full(error)):
        return None
    temp = sqlite_temp_folder()
    try:
        elsewhere = temp is not None and os.stat(temp).st_dev != os.stat(_existing(folder)).st_dev
        # Unless the folder's device is the one out of room and the other is not.
        if elsewhere and temp is not None and _spent(folder) and not _spent(temp):
            return None
    except OSError:
        return None
    return temp if elsewhere else None


def _spent(path: Path) -> bool:
    """Whether the device of `path` has next to no room left (under 1 MiB, or 0.1 %)."""
    usage = shutil.disk_usage(_existing(path))
    return usage.free < max(1 << 20, usage.total // 1000)


def unwritable(
    folder: Path,
    error: BaseException,
    *,
    kept: int | None = None,
    unwritten: int = 0,
    again: str = "to resume",
) -> str:
    """The one line a command that could not write its folder ends with (exit 3)."""
    said = f"cannot write to {folder} ({reason(error)}; {device(folder)})"
    if kept is not None:
        said += f": {kept:,} result{'s' if kept != 1 else ''} kept there"
    if unwritten:
        said += (
            f"; {unwritten:,} answer{'s' if unwritten != 1 else ''} arrived but could not be written "
            "(they will be asked for again)"
        )
    temp = _temp_elsewhere(folder, error)
    if temp is not None:
        return said + (
            f"; SQLite keeps its temporary files in {temp} ({device(temp)}): make room there or in "
            f"{folder}, or set SQLITE_TMPDIR to a folder with room, then run the same command again {again}"
        )
    if is_full(error):
        return said + f"; make room there, then run the same command again {again}"
    return said + f"; fix that (a disk failing?), then run the same command again {again}"


def no_locks(folder: Path, error: OSError) -> str:
    """Why a folder on a filesystem that gives no locks is refused (exit 2)."""
    mount = mount_of(folder)
    fs = "its filesystem" if mount is None else f"its filesystem ({mount.fstype} mounted at {mount.point})"
    return (
        f"cannot lock {folder}: {fs} gives no file locks ({reason(error)}), and without one two runs "
        "could write there at once; use a folder on a local disk for --output, or a mount with "
        "locking enabled (NFS with lockd; not 'nolock')"
    )
