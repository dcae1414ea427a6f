"""The only task that writes the output folder.

    OUT/results.jsonl   one whole line per success, appended, flushed as written, synced
                        at least every second and at exit
    OUT/errors.jsonl    what is failed now: appended as failures come, rewritten at the end
                        from the ledger so that a job that later succeeds is no longer listed
    OUT/ledger.sqlite   the index of both (see `pipeline.output.ledger`)

A crash can tear at most the last line of results.jsonl; `repair.reconcile` repairs it (and
any line the index has not seen) before a run starts, so no result is read twice or lost.
Results come in the order they finish, not in input order: `custom_id` ties each to its line.

A write that fails (a full disk, a failing one) stops the run, and loses nothing: what
could not be written is kept in memory and tried again, line by line, before the run ends;
ids leave the queue for the index only once a commit holds them; and after a failed fsync
nothing more is committed in this run (Linux may have dropped the pages it could not write,
and says so only once), so the next run's repair reads from the last offset known good.
"""

from __future__ import annotations

import contextlib
import heapq
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream

from pipeline.account.books import Books
from pipeline.job import Failure, Outcome, Success
from pipeline.output.appendfile import AppendFile
from pipeline.output.folder import ERRORS, RESULTS, write_lines
from pipeline.output.ledger import Ledger
from pipeline.output.lines import Redactor as Redactor
from pipeline.output.lines import error_line, failure_key, result_line

SYNC_EVERY = 1.0  # seconds


class Writer:
    def __init__(
        self,
        folder: Path,
        ledger: Ledger,
        books: Books,
        redact: Redactor,
    ) -> None:
        self.on_input_error: Callable[[Failure], None] | None = None  # to tell the user at once
        self.on_broken: Callable[[BaseException], None] | None = None  # the folder took no more
        self.redone: Callable[[str], bool] | None = None  # ids a --redo chose (their old answer kept)
        self.broken: OSError | sqlite3.Error | None = None  # the first write that failed
        self.folder = folder
        self.ledger = ledger
        self.books = books
        self.redact = redact
        self.written = 0  # outcomes written in this run
        self.unwritten: list[Outcome] = []  # arrived, but a write failed: tried again at the end
        # Plain descriptors, not buffered files: one write per batch, nothing held back that
        # a failed write could leave half-flushed later.
        self._results = AppendFile(folder / RESULTS)
        try:
            self._errors = AppendFile(folder / ERRORS)
        except BaseException:
            self._results.close()
            raise
        # What the files hold that the index does not yet, in the order written.
        self._done: list[str] = []
        self._succeeded_keys: list[str] = []
        self._failed: list[tuple[str, int, str, bytes]] = []
        self._trusted = True  # no fsync has failed in this run
        self._lock = anyio.Lock()
        self.drained = anyio.Event()  # set once every sender has closed and all is written
        self._last_sync = time.monotonic()
        self.also: Callable[[], Awaitable[None]] | None = None  # at each checkpoint: the answer cache's flush

    # -- writing -------------------------------------------------------------------------------

    def write(self, outcomes: list[Outcome], successes: list[Success] | None = None) -> None:
        """Append the outcomes' lines; only once they are in the files are they counted and
        queued for the index, so a failed write (a full disk) records nothing false. What a
        failed write did not take is kept in `unwritten`, and the error raised. `successes`:
        the outcomes' successes, when the caller has picked them out already."""
        if successes is None:
            successes = [o for o in outcomes if isinstance(o, Success)]
        failures = [] if len(successes) == len(outcomes) else [o for o in outcomes if isinstance(o, Failure)]
        try:
            if successes:
                self._write_successes(successes)
        except OSError:
            self.unwritten += [*successes[self._results.kept :], *failures]
            raise
        try:
            if failures:
                self._write_failures(failures)
        except OSError:
            self.unwritten += failures[self._errors.kept :]
            raise

    def _write_successes(self, successes: list[Success]) -> None:
        # The lines' ids from one read of the system's randomness, not one read (a system
        # call) a line.
        ids = os.urandom(12 * len(successes)).hex()
        lines = (result_line(s, ids[24 * i : 24 * i + 24]) for i, s in enumerate(successes))
        try:
            # The key out of the batch in one search, not one a line: it holds no line break
            # (an HTTP header cannot), so no copy of it spans two lines.
            self._results.append(self.redact(b"".join(lines)))
        except OSError:
            self._succeeded(successes[: self._results.kept])
            raise
        self._succeeded(successes)

    def _succeeded(self, successes: list[Success]) -> None:
        self.books.kept(successes)
        ids = [success.request.custom_id for success in successes]
        self._done += ids
        if self.ledger.failed_count:
            self._succeeded_keys += ids
        self.written += len(successes)

    def _write_failures(self, failures: list[Failure]) -> None:
        if self.redone is not None:
            for f in failures:
                if f.custom_id is not None and not f.is_input_error and self.redone(f.custom_id):
                    f.extra["kept"] = "the earlier answer stays in results.jsonl; a later run tries again"
        lines = [self.redact(error_line(f)) for f in failures]
        try:
            self._errors.append(b"".join(lines))
        except OSError:
            kept = self._errors.kept
            self._listed(failures[:kept], lines[:kept])
            raise
        self._listed(failures, lines)

    def _listed(self, failures: list[Failure], lines: list[bytes]) -> None:
        for failure, line in zip(failures, lines, strict=True):
            self.books.failed(failure)
            kind = "input" if failure.is_input_error else "request"
            self._failed.append((failure_key(failure), failure.line, kind, line))
            if failure.is_input_error and self.on_input_error is not None:
                self.on_input_error(failure)
        self.written += len(failures)

    def fail(self, error: OSError | sqlite3.Error) -> None:
        """A write to the folder failed: the run is told, and stops dispatching."""
        if self.broken is None:
            self.broken = error
        if self.on_broken is not None:
            self.on_broken(error)

    async def consume(self, outcomes: MemoryObjectReceiveStream[Outcome]) -> None:
        """Write everything the workers and the reader send, until they all close."""
        async with outcomes:
            async for first in outcomes:
                batch = [first]
                # Take whatever else is already waiting: one write and flush per batch.
                with contextlib.suppress(anyio.WouldBlock, anyio.EndOfStream):
                    while len(batch) < 1024:
                        batch.append(outcomes.receive_nowait())
                successes = [o for o in batch if isinstance(o, Success)]
                # the attempts that made them (`Books.answered`); a reused answer made none
                sent = len(successes) - sum(s.reused for s in successes) if successes else 0
                if sent:
                    self.books.answered(sent)
                if self.broken is not None:
                    # The folder takes no more for now: keep what arrives (bounded by what
                    # was in flight, as nothing new is sent) and drain, so nobody waits on us.
                    self.unwritten += batch
                    continue
                try:
                    self.write(batch, successes)
                except OSError as e:
                    self.fail(e)
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
        """Sync the files, then let the index catch up to what is now on disk: in one commit,
        or not at all (the ids stay queued for the next checkpoint)."""
        with anyio.CancelScope(shield=True):
            async with self._lock:
                self._last_sync = time.monotonic()
                if not self._trusted:
                    return
                # One snapshot: what the files hold now, and the usage that counts exactly
                # that. The writer may append more while the sync runs; that waits for next time.
                done, succeeded, failed = len(self._done), len(self._succeeded_keys), len(self._failed)
                offset = self._results.size
                usage = self.books.usage.state()
                try:
                    await anyio.to_thread.run_sync(self._sync_files)
                except OSError as e:
                    self._trusted = False
                    self.fail(e)
                    return
                try:
                    self.ledger.add_done(self._done[:done])
                    self.ledger.add_failed(self._failed[:failed])
                    self.ledger.drop_failed(self._succeeded_keys[:succeeded])
                    self.ledger.put("results_offset", offset)
                    self.ledger.put("usage", usage)
                    self.ledger.commit()
                except BaseException as e:
                    with contextlib.suppress(sqlite3.Error):
                        self.ledger.rollback()
                    if not isinstance(e, sqlite3.Error):
                        raise
                    if self.ledger.landed:  # the index holds them: counted twice if kept queued
                        del self._done[:done], self._succeeded_keys[:succeeded], self._failed[:failed]
                    self.fail(e)
                    return
                del self._done[:done], self._succeeded_keys[:succeeded], self._failed[:failed]
            if self.also is not None:
                await self.also()

    def _sync_files(self) -> None:
        os.fsync(self._results.fd)
        os.fsync(self._errors.fd)

    async def settle(self) -> None:
        """Before the run ends: write what arrived but could not be written, line by line
        (a line may fit where a batch did not, and a full disk may have room again), then
        bring the index up to date."""
        waiting, self.unwritten = self.unwritten, []
        for outcome in waiting:
            with contextlib.suppress(OSError):
                self.write([outcome])
        await self.checkpoint()

    @property
    def behind(self) -> bool:
        """Whether the files hold lines of this run that the index does not."""
        return not self._trusted or bool(self._done or self._failed or self._succeeded_keys)

    @property
    def results_kept(self) -> int:
        """Results in results.jsonl now, indexed or not."""
        return self.ledger.done_count + len(self._done)

    @property
    def answers_lost(self) -> int:
        """Answers that arrived but are in no file: they will be asked for again."""
        return sum(isinstance(o, Success) for o in self.unwritten)

    def close(self) -> None:
        try:
            self._results.close()
        finally:
            self._errors.close()

    def _failures_now(self) -> Iterator[bytes]:
        """The index's failures, and those it does not hold yet; none of an id that has
        succeeded since, in input order."""
        waiting = {key: (line, record) for key, line, _, record in self._failed}
        gone = set(self._succeeded_keys) | waiting.keys()
        listed = ((line, key, record) for line, key, _, record in self.ledger.failures() if key not in gone)
        mine = sorted((line, key, record) for key, (line, record) in waiting.items())
        for _, _, record in heapq.merge(listed, mine):
            yield record

    def rewrite_errors(self) -> int:
        """errors.jsonl := what is failed now, in input order (atomically)."""
        path = self.folder / ERRORS
        count = write_lines(path, self._failures_now())
        try:
            fresh = AppendFile(path)
        except BaseException:
            self._errors.torn = True  # it holds the file just replaced: what it took is lost
            raise
        old, self._errors = self._errors, fresh
        old.close()
        return count
