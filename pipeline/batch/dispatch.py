"""The middle of a run at `--tier batch`: the same reader, writer, ledger, books and progress as
a synchronous run; between them, batches instead of requests.

outer task group
├── writer.consume        the reader's and the stager's failures -> OUT/errors.jsonl
├── writer.sync_forever
├── LiveReport.follow     OUT/report.html while the batches are followed (see run.live)
├── progress.tick         the batches' states and counts, and how long they have waited
├── host.watch            1st SIGINT/SIGTERM: stop following (the batches go on); 2nd: cancel
└── work scope
    └── task group
        ├── reader.feed   input -> [requests]
        ├── stage         [requests] -> OUT/batches/<n>.jsonl, staged in the book
        ├── Follower.run  submit, look, take in (results written by the writer), go again
        └── Clearer.run   what each batch taken in left at the provider, deleted

Stopping stops the reader and the following, and leaves the batches running at the provider:
they go on, and are paid for as they finish; the same command takes them in, and `pipeline
cancel OUT` cancels them.
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from functools import partial
from typing import TYPE_CHECKING, Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.batch.book import CREATING, DROPPED, ENDPOINT, LIVE, RUNNING, STAGED, TAKEN, Book
from pipeline.batch.clear import Clearer, uncleared
from pipeline.batch.clock import Clock
from pipeline.batch.follow import Follower
from pipeline.batch.intake import Intake
from pipeline.batch.now import SendNow
from pipeline.batch.stage import Files, stage
from pipeline.batch.twins import Twins
from pipeline.errors import RunStopped, SettingsError
from pipeline.job import Outcome, Request, Success
from pipeline.run.live import LiveReport
from pipeline.send.batchapi import BatchApi, NoBatchApi
from pipeline.send.client import Client
from pipeline.settings import Settings
from pipeline.urls import redacted

if TYPE_CHECKING:
    from pipeline.batch.keep import Keep
    from pipeline.run.runner import Run
    from pipeline.send.reuse import Reuse
    from pipeline.send.verdict import Verdict


def no_batch_api(settings: Settings) -> SettingsError:
    """A run at --tier batch where the endpoint has no batch API: exit 2, nothing uploaded."""
    return SettingsError(
        f"{redacted(settings.base_url)} has no batch API (a 404 on its files or batches path); "
        "nothing was uploaded; --tier sync sends the same job to it now"
    )


async def run_batches(
    run: Run,
    api_key: str | None,
    open_client: Callable[[Settings, str | None], AbstractAsyncContextManager[Client]],
) -> None:
    """A run's middle at `--tier batch`: the batch API its host opens (and, `--then sync`, the
    synchronous client), then `dispatch_batches`."""
    settings = run.settings
    try:
        async with run.host.batch_api(settings, api_key) as api:
            if settings.then != "sync":
                await dispatch_batches(run, api)
            else:  # what batches leave undone is sent now, as a synchronous run sends
                async with open_client(settings, api_key) as client:
                    await dispatch_batches(run, api, client=client)
    except NoBatchApi:  # (the shape looked for as the API opens: nothing uploaded yet)
        raise no_batch_api(settings) from None


async def dispatch_batches(
    run: Run, api: BatchApi, *, clock: Clock | None = None, client: Client | None = None
) -> None:
    """The batch tier's middle; `client`: `--then sync`'s, for what batches leave undone."""
    settings, control, writer, ledger = run.settings, run.control, run.writer, run.ledger
    try:
        await api.check()
    except NoBatchApi:
        raise no_batch_api(settings) from None
    clock = clock or run.host.batch_clock or Clock()
    book = Book(ledger, settings.folder)
    # A URL carrying a secret (a password, or a user's token alone: what `redacted` hides) is
    # not kept: the ledger is no place for it; cancel then asks for --base-url.
    secret = redacted(settings.base_url) != settings.base_url
    ledger.put(
        ENDPOINT,
        {
            "base_url": None if secret else settings.base_url,
            "api_key_env": settings.api_key_env,
            "batch_api": settings.batch_api,
            "keep_files": settings.batch_keep_files,  # (pipeline cancel clears as the run would)
        },
    )
    restage = book.forget_staged() if ledger.changes else []  # (a --redo changed the job)
    for n in [*book.forget_filling(), *book.forget_staged_done(), *restage]:
        _remove(book, n)
    for old in book.batches(TAKEN, DROPPED):
        _remove(book, old.n)
    live_ones = book.follow_live()
    scope = reuse.scope if (reuse := run.reuse) is not None else redacted(settings.base_url).rstrip("/")
    twins = Twins(book, scope=scope)  # (always: a run without a cache answers the twins an earlier one left)
    live = book.followed if twins.sweep() or live_ones else None
    ledger.commit()

    def commit() -> bool:
        # Each of these commits comes before the provider is told (a batch made, its files
        # deleted): synced, so that a power cut cannot forget one the provider acted on (a
        # batch made twice and paid twice; results read back from files deleted). A few a batch.
        try:
            ledger.commit()
            ledger.flush()
        except (sqlite3.Error, OSError) as e:
            with contextlib.suppress(sqlite3.Error):
                ledger.rollback()
            writer.fail(e)
            return False
        return True

    def files() -> Files:
        return Files(book, max_lines=api.max_lines, max_bytes=api.max_bytes, text_only=api.shape == "inline")

    clearer = Clearer(api, book, commit=commit, say=run.progress.say, going=lambda: control.dispatching)
    intake = Intake(
        api=api,
        book=book,
        ledger=ledger,
        writer=writer,
        books=run.books,
        verdict=run.verdict,
        max_attempts=settings.max_attempts,
        files=files,
        commit=commit,
        say=run.progress.say,
        wall=clock.wall,
        now=SendNow(run.attempts(client), concurrency=settings.concurrency) if client is not None else None,
        sync_prices=settings.prices,
        keep=_keep(run),
        twins=twins,
    )
    follower = Follower(
        api=api,
        book=book,
        intake=intake,
        control=control,
        clock=clock,
        poll=settings.batch_poll,
        give_up=settings.give_up_after,
        commit=commit,
        say=run.progress.say,
        budget=run.books.budget,
    )
    run.follower = follower
    for batch in book.batches(STAGED, CREATING):
        follower.queue.append(batch.n)
    for batch in book.batches(RUNNING):
        follower.running(batch.n, at=batch.at)  # looked at once: it may have ended meanwhile
    for batch in book.batches(CREATING, RUNNING):
        follower.hold(batch, made=True)
    worst = run.books.budget.worst_case if run.books.budget is not None else None
    kept = None if reuse is None else partial(_kept, reuse, run.verdict, run.fresh)
    run.progress.batches = follower

    def staged(n: int) -> bool:
        if not commit():
            return False
        follower.staged(n)
        return True

    async def stage_all(
        requests: MemoryObjectReceiveStream[Request], failures: MemoryObjectSendStream[Outcome]
    ) -> None:
        # (closed whatever happens, even before staging begins: the reader and the writer
        # wait for them)
        with requests, failures:
            try:
                if reuse is not None and live is not None:
                    await twins.seed(batch.n for batch in book.batches(*LIVE))
                batch_files = files()
                try:
                    await stage(
                        requests,
                        failures,
                        batch_files,
                        books=run.books,
                        live=live,
                        staged=staged,
                        worst=worst,
                        kept=kept,
                        twins=None if reuse is None else twins,
                    )
                finally:
                    batch_files.abandon()
            finally:
                follower.staging_done()

    async def follow() -> None:
        with taken_send:  # (the last batch taken in: the clearer ends once it is cleared)
            await follower.run()

    async def guarded(task: Callable[..., Awaitable[None]], *args: Any) -> None:
        """A write to the folder that fails (its staged files, its book: a full disk, a
        failing one) stops the run, resumable, as a write of the writer's does."""
        try:
            await task(*args)
        except (OSError, sqlite3.Error) as e:
            if isinstance(e, sqlite3.Error):
                with contextlib.suppress(sqlite3.Error):
                    ledger.rollback()
            writer.fail(e)

    # Batches taken in: what they left at the provider deleted beside the following, those an
    # earlier run took in and did not clear first.
    left = [] if settings.batch_keep_files else [batch.n for batch in uncleared(book)]
    taken_send, taken_recv = anyio.create_memory_object_stream[int](math.inf)
    for n in left:
        taken_send.send_nowait(n)
    if not settings.batch_keep_files:
        intake.taken = partial(_send, taken_send)
    requests_send, requests_recv = anyio.create_memory_object_stream[Request](64)
    outcomes_send, outcomes_recv = anyio.create_memory_object_stream[Outcome](64)
    async with anyio.create_task_group() as outer:
        outer.start_soon(writer.consume, outcomes_recv)
        outer.start_soon(writer.sync_forever)
        outer.start_soon(LiveReport(run).follow)
        outer.start_soon(run.progress.tick)
        outer.start_soon(run.host.watch, control, run.progress)
        outer.start_soon(run._count_total)
        with anyio.CancelScope() as work_scope:
            control.work_scope = work_scope
            control.on_stop.append(follower.wake)
            async with anyio.create_task_group() as tg:
                tg.start_soon(run._read, requests_send, outcomes_send.clone(), None)
                tg.start_soon(guarded, stage_all, requests_recv, outcomes_send)
                tg.start_soon(guarded, follow)
                tg.start_soon(guarded, clearer.run, taken_recv)
        if control.dispatching and follower.left:  # (never, but a line must not pass for done)
            control.stop(
                RunStopped("batches were left untaken: run the same command again", code="batches_left")
            )
        await writer.drained.wait()
        outer.cancel_scope.cancel()


def _keep(run: Run) -> Keep | None:
    """Where the run has an answer cache: the answers its batches bring, kept there."""
    if run.reuse is None:
        return None
    from pipeline.batch.keep import Keep  # (the cache's modules: only for a run with one)

    return Keep(run.reuse, run.fresh)


def _kept(
    reuse: Reuse, verdict: Verdict | None, fresh: Callable[[str], bool] | None, request: Request
) -> tuple[bytes | None, Success | None]:
    """The request's key and its kept answer; neither for a line a --redo chose: a new answer
    is asked for (staged, as the synchronous tier sends it: not the cache's, nor a twin's)."""
    if fresh is not None and fresh(request.custom_id):
        return None, None
    key = reuse.key(request)
    return key, reuse.taken(request, key, verdict)


def _send(stream: MemoryObjectSendStream[int], n: int) -> None:
    with contextlib.suppress(anyio.BrokenResourceError):  # (the clearer stopped: the next run clears)
        stream.send_nowait(n)


def _remove(book: Book, n: int) -> None:
    with contextlib.suppress(OSError):
        book.path(n).unlink(missing_ok=True)
