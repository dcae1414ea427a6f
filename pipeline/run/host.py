"""Where a run runs, and the two things that decides: the pace it shares, and who stops it.

A process of its own (`Host`): its own pace, or the account's through Redis
(`--shared-limit`); stopped by Ctrl-C or SIGTERM. A shard on a Ray cluster
(`pipeline.cluster.shard.ShardHost`): the account's pace in a Ray actor; stopped by the
driver, to which it reports its progress. Everything else about a run is the same.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING

import anyio

from pipeline.pace.pacer import Pacer

if TYPE_CHECKING:
    from pipeline.batch.clock import Clock
    from pipeline.run.control import Control
    from pipeline.run.progress import Progress
    from pipeline.send.batchapi import BatchApi
    from pipeline.settings import Settings


def scope_key(account: str, model: str | None) -> str:
    """A scope's name in a shared store: the account's, and for a model a hash of its name
    (a name is outside text, of any length)."""
    if model is None:
        return account
    import hashlib

    return f"{account}:{hashlib.sha256(model.encode()).hexdigest()[:16]}"


class Host:
    """A run in a process of its own."""

    batch_clock: Clock | None = None  # what the batch tier waits by (None: the real one; tests fake it)

    def pacer(
        self,
        settings: Settings,
        api_key: str | None,
        request_rate: float | None,
        token_rate: float | None,
        say: Callable[[str], None],
        model: str | None = None,
    ) -> Pacer:
        """The pace of a scope (the account's, or `model`'s): the run's own, or shared by the
        account's processes (`--shared-limit`)."""
        if settings.shared_limit is None:
            return Pacer(request_rate=request_rate, token_rate=token_rate)
        from functools import partial

        from pipeline.pace.leased import shared_pacer
        from pipeline.pace.store import Store, account_key
        from pipeline.urls import redacted

        return shared_pacer(
            partial(Store, settings.shared_limit, scope_key(account_key(settings.base_url, api_key), model)),
            redacted(settings.shared_limit),
            request_rate=request_rate,
            token_rate=token_rate,
            processes=settings.shard.n if settings.shard else 1,
            say=say,
        )

    def batch_api(self, settings: Settings, api_key: str | None) -> AbstractAsyncContextManager[BatchApi]:
        """The endpoint's batch API, for a run at `--tier batch` (`pipeline.batch`): the shape
        `batch_api` asks for, else the one the endpoint offers."""
        from pipeline.send.batchclient import open_batch_api  # (only a batch run needs it)

        opened: AbstractAsyncContextManager[BatchApi] = open_batch_api(
            settings.base_url,
            api_key,
            settings.batch_api,
            max_lines=settings.batch_max_lines,
            max_bytes=settings.batch_max_bytes,
        )
        return opened

    async def watch(self, control: Control, progress: Progress) -> None:
        """1st SIGINT/SIGTERM: stop dispatching; 2nd: cancel the work (a task of the run)."""
        if threading.current_thread() is not threading.main_thread():
            return  # signals can only be caught there; the caller owns them
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                progress.say(control.interrupt() if control.dispatching else control.cancel())
