"""`pipeline cancel OUT` writes the folder's book only under the folder's lock, as a run does;
while a run holds the folder (the nightly run still going) it cancels that run's batches at
the provider and writes nothing, and the run takes in what they did and stops."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

import anyio

from pipeline.batch.cancel import cancel_batches
from pipeline.output.folder import LEDGER, lock_folder
from pipeline.run.runner import run
from pipeline.run.summary import Summary
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeClock, FakeHost, at_batch_tier, stopping_at_a_look


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
