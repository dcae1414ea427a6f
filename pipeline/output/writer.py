"""The only task that writes the output folder.

    OUT/results.jsonl   one whole line per success, appended, flushed as written, synced
                        at least every second and at exit
    OUT/errors.jsonl    what is failed now: appended as failures come, rewritten at the end
                        from the ledger so that a job that later succeeds is no longer listed
    OUT/ledger.sqlite   the index of both (see `pipeline.output.ledger`)

A crash can tear at most the last line of results.jsonl; `folder.reconcile` repairs it (and
any line the index has not seen) before a run starts, so no result is read twice or lost.
Results come in the order they finish, not in input order: `custom_id` ties each to its line.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline.account.books import Books
from pipeline.input import jsonl
from pipeline.job import Failure, Outcome, Success
from pipeline.output.folder import ERRORS, RESULTS
from pipeline.output.ledger import Ledger

SYNC_EVERY = 1.0  # seconds


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def _append(fd: int, data: bytes, size: int) -> int:
    """Append all of `data` to a file of `size` bytes; returns the new size. If the write
    fails part way (a full disk), the file is cut back to `size` so no torn line stays."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, size)
        raise
    return size + len(data)


def _result_line(success: Success) -> bytes:
    reply = success.reply
    # The body's own bytes are copied in as they came; parsed and re-encoded only when they
    # span lines or the line must go through the slow, lossless encoder (see `jsonl`).
    body: Any = orjson.Fragment(reply.raw) if reply.raw is not None else reply.body
    line: dict[str, Any] = {
        "id": "batch_req_" + os.urandom(12).hex(),
        "custom_id": success.request.custom_id,
        "response": {"status_code": reply.status, "request_id": reply.request_id, "body": body},
        "error": None,
    }
    if success.parsed is not None:
        line["parsed"] = success.parsed
    if success.request.metadata is not None:
        line["metadata"] = success.request.metadata
    try:
        return orjson.dumps(line) + b"\n"
    except TypeError:
        line["response"]["body"] = reply.body
        return jsonl.dumps(line) + b"\n"


def _error_line(failure: Failure) -> bytes:
    error: dict[str, Any] = {"code": failure.code, "message": failure.message, **failure.extra}
    response = None
    if failure.status is not None or failure.body is not None:
        response = {"status_code": failure.status, "request_id": failure.request_id, "body": failure.body}
    line: dict[str, Any] = {
        "id": None,
        "custom_id": failure.custom_id,
        "response": response,
        "error": error,
        "line": failure.line,
        "attempts": failure.attempts,
    }
    if failure.metadata is not None:
        line["metadata"] = failure.metadata
    return jsonl.dumps(line, option=orjson.OPT_NON_STR_KEYS) + b"\n"


def failure_key(failure: Failure) -> str:
    # Input errors are keyed by line: the same id may be bad twice (a duplicate), and a
    # fixed line must stop being listed even if its id changed.
    if failure.is_input_error or failure.custom_id is None:
        return f"line:{failure.line}"
    return failure.custom_id


class Redactor:
    """Removes the API key from anything written out, should a server ever echo it."""

    def __init__(self, secret: str | None) -> None:
        self._secret = secret.encode() if secret and len(secret) >= 6 else None

    def __call__(self, data: bytes) -> bytes:
        if self._secret is not None and self._secret in data:
            return data.replace(self._secret, b"[REDACTED]")
        return data

    def text(self, text: str) -> str:
        return self(text.encode()).decode()


class Writer:
    def __init__(
        self,
        folder: Path,
        ledger: Ledger,
        books: Books,
        redact: Redactor,
    ) -> None:
        self.on_input_error: Callable[[Failure], None] | None = None  # to tell the user at once
        self.on_broken: Callable[[OSError], None] | None = None  # the folder took no more
        self.broken: OSError | None = None
        self.folder = folder
        self.ledger = ledger
        self.books = books
        self.redact = redact
        self.written = 0  # outcomes written in this run
        # Plain descriptors, not buffered files: one write per batch, nothing held back that
        # a failed write could leave half-flushed later.
        self._results = _open_append(folder / RESULTS)
        self._errors = _open_append(folder / ERRORS)
        self._results_size = os.fstat(self._results).st_size
        self._errors_size = os.fstat(self._errors).st_size
        self._done: list[str] = []
        self._succeeded_keys: list[str] = []
        self._failed: list[tuple[str, int, str, bytes]] = []
        self._lock = anyio.Lock()
        self.drained = anyio.Event()  # set once every sender has closed and all is written
        self._last_sync = time.monotonic()

    # -- writing -------------------------------------------------------------------------------

    def write(self, outcomes: list[Outcome]) -> None:
        """Append the outcomes' lines; only once they are in the files are they counted and
        queued for the index, so a failed write (a full disk) records nothing false."""
        successes = [o for o in outcomes if isinstance(o, Success)]
        failures = [o for o in outcomes if isinstance(o, Failure)]
        if successes:
            lines = [self.redact(_result_line(s)) for s in successes]
            self._results_size = _append(self._results, b"".join(lines), self._results_size)
            for success in successes:
                self.books.kept(success)
                self._done.append(success.request.custom_id)
                if self.ledger.failed_count:
                    self._succeeded_keys.append(success.request.custom_id)
        if failures:
            lines = [self.redact(_error_line(f)) for f in failures]
            self._errors_size = _append(self._errors, b"".join(lines), self._errors_size)
            for failure, line in zip(failures, lines, strict=True):
                self.books.failed(failure)
                kind = "input" if failure.is_input_error else "request"
                self._failed.append((failure_key(failure), failure.line, kind, line))
                if failure.is_input_error and self.on_input_error is not None:
                    self.on_input_error(failure)
        self.written += len(outcomes)

    async def consume(self, outcomes: MemoryObjectReceiveStream[Outcome]) -> None:
        """Write everything the workers and the reader send, until they all close."""
        async with outcomes:
            async for first in outcomes:
                batch = [first]
                # Take whatever else is already waiting: one write and flush per batch.
                with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
                    while len(batch) < 1024:
                        batch.append(outcomes.receive_nowait())
                if self.broken is not None:
                    continue  # the folder cannot take more: drain, so nobody waits on us
                try:
                    self.write(batch)
                except OSError as e:
                    self.broken = e
                    if self.on_broken is not None:
                        self.on_broken(e)
                    continue
                if time.monotonic() - self._last_sync >= SYNC_EVERY:
                    await self.checkpoint()
        self.drained.set()

    async def sync_forever(self) -> None:
        """Sync at least every second even when no outcome arrives to trigger it."""
        while True:
            await anyio.sleep(SYNC_EVERY)
            if time.monotonic() - self._last_sync >= SYNC_EVERY:
                await self.checkpoint()

    async def checkpoint(self) -> None:
        """Sync the files, then let the index catch up to what is now on disk."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                self._last_sync = time.monotonic()
                # One snapshot: what the files hold now, and the usage that counts exactly
                # that. The writer may append more while the sync runs; that waits for next time.
                done, self._done = self._done, []
                succeeded, self._succeeded_keys = self._succeeded_keys, []
                failed, self._failed = self._failed, []
                offset = self._results_size
                usage = self.books.usage.state()
                await anyio.to_thread.run_sync(self._sync_files)
                self.ledger.add_done(done)
                self.ledger.add_failed(failed)
                self.ledger.drop_failed(succeeded)
                self.ledger.put("results_offset", offset)
                self.ledger.put("usage", usage)
                self.ledger.commit()

    def _sync_files(self) -> None:
        os.fsync(self._results)
        os.fsync(self._errors)

    def close(self) -> None:
        os.close(self._results)
        os.close(self._errors)

    def rewrite_errors(self) -> int:
        """errors.jsonl := what is failed now, in input order (atomically)."""
        os.close(self._errors)
        count = 0
        tmp = self.folder / f".{ERRORS}.tmp"
        with tmp.open("wb") as f:
            for record in self.ledger.failures():
                f.write(record)
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / ERRORS)
        self._errors = _open_append(self.folder / ERRORS)
        self._errors_size = os.fstat(self._errors).st_size
        return count
