"""What a cache that cannot be used says: one warning line, what went wrong and what to do.
The run goes on without the cache (or without keeping answers); it never fails for it."""

from __future__ import annotations

import sqlite3
from pathlib import Path


class NewerFormat(Exception):
    """The file was made by a newer pipeline, in a format this one cannot read."""

    def __init__(self, found: object, known: int) -> None:
        super().__init__(f"format {found}, where this version knows {known}")


def code_of(error: BaseException) -> int:
    """SQLite's primary result code of `error` (0 where it has none)."""
    return int(getattr(error, "sqlite_errorcode", None) or 0) & 0xFF


def warning(error: BaseException, path: Path, *, writing_only: bool) -> str:
    """The line a run shows when the cache at `path` stops being used, or keeping answers."""
    why, fix = _diagnosis(error, path)
    if writing_only:
        return (
            f"warning: answer cache {path}: answers can no longer be kept ({why}); this run's "
            f"answers are not kept, those kept before are still reused. {fix}"
        )
    return (
        f"warning: answer cache {path}: cannot be used ({why}); the run goes on without it, "
        f"sending every request. {fix}"
    )


def _diagnosis(error: BaseException, path: Path) -> tuple[str, str]:
    """What went wrong, briefly, and what to do about it."""
    where = path.parent
    writable = f"Give a cache folder this run can write, or leave the cache off ({where})."
    if isinstance(error, NewerFormat):
        return (
            f"made by a newer pipeline: {error}",
            f"Upgrade pipeline, or give another cache folder than {where}.",
        )
    if isinstance(error, OSError):
        return error.strerror or type(error).__name__, writable
    code = code_of(error)
    why = str(error) or type(error).__name__
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return why, f"The file is damaged: move it away, and the next run makes a new one in {where}."
    if code in (sqlite3.SQLITE_READONLY, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_AUTH):
        return why, writable
    if code == sqlite3.SQLITE_FULL:
        return why, f"Free space on the disk of {where}, or lower cache_max_gb."
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return why, "Another process held it locked past the busy timeout; is one stuck?"
    return why, f"If it happens again, move {path.name} out of {where} (a new one is made)."
