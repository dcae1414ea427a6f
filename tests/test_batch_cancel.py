"""`pipeline cancel OUT` writes the folder's book only under the folder's lock, as a run does;
while a run holds the folder (the nightly run still going) it cancels that run's batches at
the provider and writes nothing, and the run takes in what they did and stops."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Collection
from typing import Any

import anyio
import pytest

from pipeline.batch.cancel import cancel_batches
from pipeline.errors import HTTPStatusError, RunStopped
from pipeline.output.folder import LEDGER, lock_folder
from pipeline.run.runner import run
from pipeline.run.summary import Summary
from pipeline.send.batchapi import BatchInfo
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl
from tests.fakebatchapi import (
    FakeBatchApi,
    FakeClock,
    FakeHost,
    Killed,
    at_batch_tier,
    stopping_at_a_look,
)


def _commits(settings: Settings) -> int:
    db = sqlite3.connect(settings.folder / LEDGER)
    try:
        (value,) = db.execute("SELECT value FROM meta WHERE key = 'commits'").fetchone()
        return int(value)
    finally:
        db.close()


async def test_cancel_while_the_folder_is_held_cancels_at_the_provider_and_writes_nothing(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(max_lines=2, looks_to_end=3)
    settings = at_batch_tier(make_settings(server[0], bodies(2)))
    assert (await run(settings, stopping_at_a_look(api))).exit_code == 130
    commits = _commits(settings)
    said: list[str] = []
    with lock_folder(settings.folder):  # (a run's lock, held: the same flock a run takes)
        status = await cancel_batches(settings.folder, api, clock=FakeClock(), say=said.append)
    assert status == 0, said
    assert api.cancelled == ["batch_1"]
    assert f"a run is using {settings.folder} now (pid " in said[0]
    assert "that run takes in what they did, then stops" in said[0]
    assert _commits(settings) == commits  # the book, not written under another's lock


async def test_cancel_during_a_run_stops_its_batches_and_the_run_keeps_what_they_did(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(max_lines=4, looks_to_end=10**9)
    settings = at_batch_tier(make_settings(server[0], bodies(4)))
    looked = anyio.Event()
    api.on_get = looked.set
    ended: list[Summary] = []
    said: list[str] = []

    async def nightly() -> None:
        ended.append(await run(settings, FakeHost(api)))

    with anyio.fail_after(20):
        async with anyio.create_task_group() as tg:
            tg.start_soon(nightly)
            await looked.wait()  # the batch is running, and the run follows it
            status = await cancel_batches(settings.folder, api, clock=FakeClock(), say=said.append)
    assert status == 0, said
    assert api.cancelled == ["batch_1"]
    assert "a run is using" in said[0]
    (summary,) = ended
    assert summary.exit_code == 3, summary.message
    assert "batch 1 was cancelled while this run followed it" in summary.message
    assert len(read_jsonl(settings.folder / "results.jsonl")) == 2  # the half it ran, kept
    assert api.made == 1  # nothing submitted again by the run the cancel stopped


class _Recorded(FakeBatchApi):
    """The provider's calls in order; its first delete killed (as by SIGKILL), so a taken
    batch is left for cancel to clear; batch_2 never ends by itself."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.order: list[str] = []
        self.kill = True

    async def get(self, batch_id: str) -> BatchInfo:
        if batch_id == "batch_1":
            if "batch_2" not in self.batches:  # batch 1 ends once batch 2 runs: else, taken in
                return self.batches[batch_id].info  # first, it could leave nothing to cancel
            return await super().get(batch_id)
        batch = self.batches[batch_id]
        if not batch.info.ended:
            batch.info = batch.info._replace(status="in_progress")
        return batch.info

    async def cancel(self, batch_id: str) -> BatchInfo:
        self.order.append(f"cancel {batch_id}")
        return await super().cancel(batch_id)

    async def clear(self, batch_id: str, files: Collection[str]) -> None:
        self.order.append(f"clear {batch_id}")
        if self.kill:
            self.kill = False
            raise Killed("between the commit and the deletes")
        await super().clear(batch_id, files)


async def test_cancel_reaches_the_running_batches_before_it_deletes_anything(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    # A provider failing its deletes holds each for the retry policy's minutes (up to 15):
    # cancelled after them, the running batches went on being paid for all that time.
    api = _Recorded(max_lines=2)
    settings = at_batch_tier(make_settings(server[0], bodies(4)))
    with pytest.raises(BaseException) as killed:  # noqa: PT011 -- a kill, by any path out
        await run(settings, FakeHost(api))
    assert "between the commit" in repr(killed.value)
    assert api.order == ["clear batch_1"]  # batch 1 taken in, batch 2 running
    said: list[str] = []
    assert await cancel_batches(settings.folder, api, clock=FakeClock(), say=said.append) == 0, said
    assert api.order[1:] == ["cancel batch_2", "clear batch_1"]
    assert api.cleared == ["batch_1"]


class _TakenAndDeleted(FakeBatchApi):
    """Cancelling takes a while (OpenRouter's, the mock's: `cancelling`), and meanwhile the run
    following the batch takes it in and, at the inline shape, deletes it: a 404 after."""

    async def cancel(self, batch_id: str) -> BatchInfo:
        self.cancelled.append(batch_id)
        batch = self.batches[batch_id]
        batch.info = batch.info._replace(status="cancelling")
        return batch.info

    async def get(self, batch_id: str) -> BatchInfo:
        if batch_id in self.cancelled:
            raise HTTPStatusError(f"404 No batch found with id {batch_id}", status=404)
        return await super().get(batch_id)


async def test_cancel_counts_a_batch_the_run_took_in_and_deleted_as_ended(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = _TakenAndDeleted(max_lines=2, looks_to_end=3)
    settings = at_batch_tier(make_settings(server[0], bodies(2)))
    assert (await run(settings, stopping_at_a_look(api))).exit_code == 130
    said: list[str] = []
    with lock_folder(settings.folder):  # (the run, still going)
        status = await cancel_batches(settings.folder, api, clock=FakeClock(), say=said.append)
    assert status == 0, said  # it was: 10 minutes of looks at a batch gone, then exit 3
    assert api.cancelled == ["batch_1"]
    assert "1 of 1 batch(es) ended" in said[-1], said
    assert not any("not ended yet" in line for line in said)


async def test_a_ledger_that_cannot_be_read_beside_a_run_is_a_stop_not_nothing_to_cancel(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(max_lines=2, looks_to_end=3)
    settings = at_batch_tier(make_settings(server[0], bodies(2)))
    assert (await run(settings, stopping_at_a_look(api))).exit_code == 130
    (settings.folder / LEDGER).write_bytes(b"not a database, as a disk failing gives" * 100)
    with lock_folder(settings.folder), pytest.raises(RunStopped) as stopped:
        await cancel_batches(settings.folder, api, clock=FakeClock(), say=lambda _: None)
    assert f"cannot read {settings.folder / LEDGER} (file is not a database)" in str(stopped.value)
    assert "nothing was cancelled: run the same command again" in str(stopped.value)
    assert api.cancelled == []
