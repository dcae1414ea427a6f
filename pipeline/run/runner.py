"""A run, end to end: the folder opened, the run's state (`Run`), its middle picked by the
tier, and its end (`pipeline.run.ending`). The middles start the run's tasks, each drawing
its task tree: requests now (`pipeline.run.dispatch`), or batches at half price
(`pipeline.batch.dispatch`). Around either, the same reader, writer, books and progress.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from pipeline.account.books import Books
from pipeline.account.cost import tier_prices
from pipeline.account.usage import Usage
from pipeline.errors import RunStopped, SettingsError
from pipeline.input.line import LineParser
from pipeline.input.reader import ReadCounts, feed
from pipeline.input.source import check_input, count_lines
from pipeline.job import Outcome, Request
from pipeline.output.device import unwritable
from pipeline.output.folder import opened
from pipeline.output.ledger import OPEN_RUN, Ledger
from pipeline.output.repair import mark_prices, open_run_mark, reconcile
from pipeline.output.writer import Redactor, Writer
from pipeline.pace.finder import RateFinder
from pipeline.pace.gate import Gate
from pipeline.pace.scopes import Scopes, pace_of
from pipeline.pace.stated import per_second
from pipeline.pace.window import Window
from pipeline.run.control import Control, Refill
from pipeline.run.dispatch import dispatch_requests
from pipeline.run.ending import close, finish
from pipeline.run.host import Host
from pipeline.run.live import abandon
from pipeline.run.metrics import Metrics, serving
from pipeline.run.preflight import START_PATIENCE, check_reachable, raise_open_files
from pipeline.run.progress import Progress
from pipeline.run.redoing import choose, fresh_ids
from pipeline.run.summary import (
    Summary,
)
from pipeline.send.attempts import Attempts
from pipeline.send.client import Client, open_client
from pipeline.send.notfound import NotFound
from pipeline.send.retry import RetryPolicy
from pipeline.send.status import Judge
from pipeline.send.verdict import compile_verdict
from pipeline.settings import Settings
from pipeline.urls import is_loopback, redacted

if TYPE_CHECKING:
    from pipeline.batch.follow import Follower
    from pipeline.run.grouping import Grouping
    from pipeline.send.reuse import Reuse


def _check_key(settings: Settings) -> str | None:
    key = settings.api_key()
    if key is None and not is_loopback(settings.base_url):
        raise SettingsError(
            f"no API key: set the environment variable {settings.api_key_env} "
            f"(or name another one with --api-key-env) to the key for {redacted(settings.base_url)}"
        )
    if key is not None and urlsplit(settings.base_url).username is not None:
        # Both would be the Authorization header, which aiohttp refuses (a crash, before).
        raise SettingsError(
            f"--base-url {redacted(settings.base_url)} holds a user and password, and the API key is "
            f"set too ({settings.api_key_env}): the request can carry only one of them; take the "
            "credentials out of the URL, or unset the key for an endpoint that wants the URL's"
        )
    return key


async def run(settings: Settings, host: Host | None = None) -> Summary:
    """Run a job to the end (or until stopped) and return its summary. Raises
    `SettingsError` when nothing could be sent because the settings are wrong. `host`: where
    it runs (a process of its own by default; a shard on a Ray cluster)."""
    settings.folder  # noqa: B018 -- raises when no output folder is given
    check_input(settings.input)
    api_key = _check_key(settings)
    raise_open_files(settings.concurrency)
    redo = settings.redo is not None
    async with serving(settings) as metrics:  # (its port taken first: a clash sends nothing)
        with opened(settings.folder, settings.fingerprint(), fresh=bool(settings.fresh), redo=redo) as ledger:
            return await _run(settings, ledger, api_key, host or Host(), metrics)


async def _run(
    settings: Settings, ledger: Ledger, api_key: str | None, host: Host, metrics: Metrics | None
) -> Summary:
    job = Run(settings, ledger, api_key, host)
    if metrics is not None:
        metrics.watch(job)
    try:
        return await _go(job, settings, api_key)
    except BaseException:
        abandon(settings.folder)  # (its end unwritten: the live page says so, and reloads no more)
        raise


async def _go(job: Run, settings: Settings, api_key: str | None) -> Summary:
    ledger = job.ledger
    try:
        if ledger.previous is not None:
            from pipeline.batch.notes import aside_note  # (an earlier run's batches, moved aside)

            note = aside_note(ledger.previous)
            if note is not None:
                job.progress.say(note)
        # An outage as the run starts is waited for a while, as one later is (a pause).
        patience = min(settings.give_up_after, START_PATIENCE)
        await check_reachable(settings.base_url, patience=patience, say=job.progress.say)
        await job.gate.scopes.check()
        if settings.tier == "batch":
            from pipeline.batch.dispatch import run_batches  # the middle at half price

            await run_batches(job, api_key, _client)
        else:
            from pipeline.batch.notes import live_note  # (batches of the folder left running)

            note = live_note(job.ledger, settings.folder)
            if note is not None:
                job.progress.say(note)
            async with _client(settings, api_key) as client:
                await dispatch_requests(job, client)
    except RunStopped as e:
        job.control.stop(e)
    finally:
        failed_now = await close(job)
    return finish(job, failed_now)


def _client(settings: Settings, api_key: str | None) -> AbstractAsyncContextManager[Client]:
    return open_client(
        settings.base_url,
        api_key=api_key,
        concurrency=settings.concurrency,
        request_timeout=settings.timeout,
        idle_timeout=settings.idle_timeout,
    )


class Run:
    """One run's state, from the folder opened to the summary returned."""

    def __init__(self, settings: Settings, ledger: Ledger, api_key: str | None, host: Host) -> None:
        self.settings = settings
        self.host = host
        self.ledger = ledger
        self.started = time.time()
        self.redact = Redactor(api_key)
        self.usage = Usage.from_state(ledger.get("usage"))
        # A batch pays the batch price: the books, the budget and the mark a repair costs by.
        prices = tier_prices(settings.prices, settings.tier)
        now_prices = settings.prices if settings.tier == "batch" else None  # (--then sync's)
        self.books = Books(self.usage, prices, self.redact.text, now_prices)
        self.usage.timeline.begin()  # this run's stretch: the repair after a crash counts in it too
        # What a killed run left unindexed is costed at its prices (its mark keeps them), as
        # merge repairs it: a batch run's answers at the batch price though this run is sync.
        killed = mark_prices(ledger.get(OPEN_RUN))
        reconcile(
            settings.folder, ledger, Books(self.usage, killed, self.redact.text) if killed else self.books
        )
        said = choose(settings, ledger, self.usage, self.started)  # (--redo: before anything is sent)
        # Set before this run writes a line, cleared with its end record: a merge knows a folder
        # whose last run was killed (its files not what the ledger lists) and repairs it first.
        ledger.put(OPEN_RUN, open_run_mark(self.started, prices))
        ledger.start_run()
        self.before = self.usage.outcomes.copy()
        self.attempts_before = self.usage.attempts
        self.reused_before = self.usage.reused
        self.writer = Writer(settings.folder, ledger, self.books, self.redact)
        try:
            self.writer.rewrite_errors()
        except BaseException:
            with contextlib.suppress(OSError):
                self.writer.close()
            raise
        self.counts = ReadCounts()
        self.control = Control(grace=settings.grace)
        # Exact token counts load a 45 MB vocabulary: only where a token budget needs them.
        token_limits = settings.tpm or any(limit.tpm for limit in settings.limits.values())
        self.parser = LineParser(settings, exact_tokens=bool(token_limits or settings.max_cost))
        self.progress = Progress(settings, self.counts, self.writer, self.usage)
        for line in said:
            self.progress.say(line)
        self.fresh = fresh_ids(ledger)  # the lines a redo chose: answers sent, not reused
        self.released = 0  # ids a redo chose that the input no longer has (`redoing.release`)
        self.writer.redone = self.fresh
        self.writer.on_input_error = self.progress.input_error
        self.writer.on_broken = self._broken
        # Pace a little under a stated limit: it absorbs the jitter between our clock and the
        # server's counting window, which would otherwise turn into 429s at its boundaries.
        request_rate, token_rate = per_second(settings.rpm), per_second(settings.tpm)
        self.pacer = host.pacer(settings, api_key, request_rate, token_rate, self.progress.say)
        self.window = Window(settings.concurrency)
        if request_rate or token_rate:
            self.window.open()  # a stated pace bounds the rate from the start
        self.finder = RateFinder(
            self.pacer,
            self.window,
            ceiling=request_rate,
            tpm_given=token_rate is not None,
            give_up=settings.give_up_after,
            stop=self.control.stop,
            say=self.progress.say,
        )
        scopes = Scopes(
            self.finder,
            limits=settings.limits,
            pacer_for=lambda model, rate, tokens: host.pacer(
                settings, api_key, rate, tokens, self.progress.say, model
            ),
        )
        self.gate = Gate(scopes)
        self.follower: Follower | None = None  # the batch tier's, when it runs
        self.usage.timeline.sample(self._sample, scopes.paces)
        self.progress.sample, self.progress.paces_of = self._sample, scopes.paces
        # The budget counts from what the folder holds, repaired: earlier runs count too.
        self.books.open_budget(settings.max_cost)
        self.verdict = None
        if settings.verdict is not None:
            self.verdict = compile_verdict(settings.verdict, settings.request, where=str(settings.job_file))
        self.reuse = _reuse(settings, prices, self.progress.say)
        if self.reuse is not None:
            self.writer.also = self.reuse.flush_if_due
        self.retry = RetryPolicy(
            max_attempts=settings.max_attempts,
            max_time=settings.max_retry_time,
            base=settings.backoff_base,
            cap=settings.backoff_max,
            max_refused=settings.give_up_after,
        )

    def _sample(self) -> tuple[int, float | None, str | None, float | None]:
        """What the timeline notes as an interval closes: in flight, the pace in force, where
        it comes from, and the limit it keeps under (requests a second)."""
        return (self.control.in_flight, *pace_of(self.finder))

    def attempts(self, client: Client) -> Attempts:
        """How one request becomes its outcome: pace, send, judge, account, retry."""
        control = self.control
        judge = Judge(NotFound(client.url, client.models, lambda: control.in_hand, self.progress.say))
        return Attempts(
            gate=self.gate,
            client=client,
            judge=judge,
            retry=self.retry,
            books=self.books,
            control=control,
            verdict=self.verdict,
            reuse=self.reuse,
            fresh=self.fresh,
        )

    async def _read(
        self,
        requests: MemoryObjectSendStream[Request],
        failures: MemoryObjectSendStream[Outcome],
        refill: Refill | None,
        grouping: Grouping | None = None,
    ) -> None:
        with anyio.CancelScope() as scope:
            self.control.on_stop.append(scope.cancel)  # stopping the run stops the reader at once
            try:
                await feed(
                    self.settings.input,
                    self.parser,
                    self.ledger,
                    requests,
                    failures,
                    self.counts,
                    refill,
                    grouping,
                )
            except RunStopped as e:  # the input cannot be read on
                self.control.stop(e)
            except sqlite3.Error as e:  # the ledger's note of the ids read: a full disk, a failing one
                with contextlib.suppress(sqlite3.Error):
                    self.ledger.rollback()
                self.writer.fail(e)

    def _broken(self, error: BaseException) -> None:
        self.control.stop(RunStopped(unwritable(self.settings.folder, error), code="output_unwritable"))

    async def _count_total(self) -> None:
        total = await anyio.to_thread.run_sync(count_lines, self.settings.input, abandon_on_cancel=True)
        self.counts.total = total


def _reuse(settings: Settings, prices: Any, warn: Callable[[str], None]) -> Reuse | None:
    """The answer cache, where the job names one (scoped by the endpoint: answers kept
    against one server are never served for another's requests)."""
    if settings.cache is None:
        return None
    from pipeline.send.reuse import Reuse, scope_of

    return Reuse(
        settings.cache,
        scope=scope_of(settings.base_url),
        prices=prices,
        now_prices=settings.prices if settings.tier == "batch" else None,
        max_gb=settings.cache_max_gb,
        warn=warn,
    )


def loop_options() -> dict[str, Any]:
    """anyio's asyncio options: uvloop where it is installed (the `fast` extra)."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def run_sync(settings: Settings) -> Summary:
    """`run` for code that is not async (a script, an Airflow task)."""
    check_input(settings.input)  # before the loop: a closed fd 0 would be its (uvloop aborts)
    return anyio.run(run, settings, backend="asyncio", backend_options=loop_options())
