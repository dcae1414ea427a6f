"""What a batch taken in leaves at the provider (its prompts and answers: the user's data) is
deleted once it is committed taken, never before; a run killed between the two leaves it to
the next run, or to `pipeline cancel`; a delete that fails never fails the run; and
`batch_keep_files = true` keeps all of it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from pipeline.batch.book import Book
from pipeline.batch.cancel import cancel_batches
from pipeline.batch.clear import CLEARED
from pipeline.errors import HTTPStatusError
from pipeline.output.folder import LEDGER
from pipeline.output.ledger import Ledger
from pipeline.run.runner import run
from pipeline.send.batchapi import BatchInfo
from pipeline.send.batchclient import open_batch_api
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeClock, FakeHost, Killed, at_batch_tier
from tests.test_batch_mock import MockHost


async def _stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url.rsplit("/v1", 1)[0] + "/mock/stats") as r:
        stats: dict[str, Any] = await r.json()
        return stats["batch"]


@pytest.mark.parametrize("shape", ["files", "inline"])
async def test_a_run_leaves_nothing_of_its_batches_at_the_provider(
    mock: Callable[..., Any], make_settings: Callable[..., Settings], shape: str
) -> None:
    rows = bodies(9)
    rows[2]["messages"][0]["content"] = "fail_me please"  # an error file too, at the files shape
    async with mock(batch_api=shape, batch_max_lines=4) as (url, _):
        settings = at_batch_tier(make_settings(url, rows), batch_api=shape)
        summary = await run(settings, MockHost())
        assert summary.exit_code == 1, summary.message  # (the line that fails)
        assert len(read_jsonl(settings.folder / "results.jsonl")) == 8
        stats = await _stats(url)
        assert stats["batches_created"] == 3
        assert stats["files_alive"] == 0  # inputs, outputs and the error file, all deleted
        if shape == "inline":
            assert stats["batches_alive"] == 0  # OpenRouter's batches hold the requests and answers


async def test_batch_keep_files_keeps_them_for_an_audit_at_the_provider(
    mock: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    async with mock(batch_api="files", batch_max_lines=4) as (url, _):
        settings = at_batch_tier(make_settings(url, bodies(5)), batch_api="files", batch_keep_files=True)
        summary = await run(settings, MockHost())
        assert summary.exit_code == 0, summary.message
        assert (await _stats(url))["files_alive"] == 4  # two batches: an input and an output each


class KilledAtClear(FakeBatchApi):
    """Killed (as by SIGKILL) at its first delete: after the batch was committed taken."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.kill = True
        self.asked: list[tuple[str, tuple[str, ...]]] = []

    async def clear(self, batch_id: str, files: Collection[str]) -> None:
        self.asked.append((batch_id, tuple(files)))
        if self.kill:
            self.kill = False
            raise Killed("between the commit and the deletes")
        await super().clear(batch_id, files)


def _cleared(settings: Settings) -> list[bool]:
    ledger = Ledger(settings.folder / LEDGER)
    try:
        return [bool((b.info or {}).get(CLEARED)) for b in Book(ledger, settings.folder).batches("taken")]
    finally:
        ledger.close()


async def test_a_run_killed_between_the_commit_and_the_deletes_leaves_them_to_the_next_run(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = KilledAtClear(max_lines=2)
    settings = at_batch_tier(make_settings(server[0], bodies(2)))
    with pytest.raises(BaseException) as killed:  # noqa: PT011 -- a kill, by any path out
        await run(settings, FakeHost(api))
    assert "between the commit" in repr(killed.value)
    assert len(read_jsonl(settings.folder / "results.jsonl")) == 2  # taken in before the deletes
    assert api.cleared == []
    assert _cleared(settings) == [False]

    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert api.cleared == ["batch_1"]  # the next run deleted what the killed one left
    assert api.made == 1
    assert _cleared(settings) == [True]
    summary = await run(settings, FakeHost(api))
    assert api.cleared == ["batch_1"]  # and once only


async def test_pipeline_cancel_deletes_what_a_taken_batch_left(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = KilledAtClear(max_lines=2)
    settings = at_batch_tier(make_settings(server[0], bodies(2)))
    with pytest.raises(BaseException) as killed:  # noqa: PT011 -- a kill, by any path out
        await run(settings, FakeHost(api))
    assert "between the commit" in repr(killed.value)
    said: list[str] = []
    assert await cancel_batches(settings.folder, api, clock=FakeClock(), say=said.append) == 0
    assert api.cleared == ["batch_1"]
    assert _cleared(settings) == [True]


async def test_a_delete_that_fails_is_one_warning_and_the_run_ends_well(
    make_settings: Callable[..., Settings], server: tuple[str, Any], capsys: Any
) -> None:
    class Forbidden(FakeBatchApi):
        async def clear(self, batch_id: str, files: Collection[str]) -> None:
            self.cleared.append(batch_id)
            raise HTTPStatusError("403 the key may not delete files", status=403)

    api = Forbidden(max_lines=2)
    settings = at_batch_tier(make_settings(server[0], bodies(6), quiet=False))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert len(read_jsonl(settings.folder / "results.jsonl")) == 6
    said = [line for line in capsys.readouterr().err.splitlines() if "could not be deleted" in line]
    assert len(said) == 1, said  # three batches, one line
    assert "403 the key may not delete files" in said[0]
    assert "the next run into the folder tries again" in said[0]
    assert api.cleared == ["batch_1"]  # no more asked of a provider that refuses (nor waited for)
    assert _cleared(settings) == [False, False, False]


async def test_the_client_deletes_each_file_and_a_file_gone_already_is_no_failure(
    mock: Callable[..., Any], tmp_path: Any
) -> None:
    staged = tmp_path / "1.jsonl"
    staged.write_bytes(
        b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", '
        b'"body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]}}\n'
    )
    async with mock(batch_api="files") as (url, _), open_batch_api(url, None, "files") as api:
        info = await api.submit(staged, tag="pipeline-x-1", model="m", lines=1)
        while not info.ended:
            info = await api.get(info.id)
        files = [f for f in (info.input_file, info.output_file, info.error_file) if f]
        assert len(files) == 2  # (no error file: OpenAI makes none that would be empty)
        assert (await _stats(url))["files_alive"] == 2
        await api.clear(info.id, files)
        assert (await _stats(url))["files_alive"] == 0
        await api.clear(info.id, files)  # 404s: gone already


class _NoTags(FakeBatchApi):
    """A provider that keeps no tag (OpenRouter's batches have no metadata): a batch made by a
    run killed before it noted the id is found by its model and size (`batchfind.pick`), and
    may be another folder's (a shard's, another nightly job's) of the same model and size."""

    async def find(
        self,
        tag: str,
        *,
        since: float,
        model: str | None = None,
        lines: int | None = None,
        taken: Collection[str] = (),
    ) -> BatchInfo | None:
        self._step("find")
        for batch in self.batches.values():
            info = batch.info
            if info.id not in taken and info.model == model and len(batch.lines) == lines:
                return info
        return None


async def test_a_batch_found_by_its_size_that_held_anothers_lines_is_not_deleted(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    api = _NoTags(max_lines=2)
    settings = at_batch_tier(make_settings(server[0], bodies(2)))
    api.die_at = 1  # killed making its batch, before the provider had it
    with pytest.raises(BaseException) as killed:  # noqa: PT011 -- a kill, by any path out
        await run(settings, FakeHost(api))
    assert "submit" in repr(killed.value)
    # Meanwhile another folder's run made a batch alike: the same model, two lines.
    theirs = tmp_path / "theirs.jsonl"
    theirs.write_bytes(
        b"".join(
            orjson.dumps({"custom_id": f"theirs-{i}", "body": row}) + b"\n" for i, row in enumerate(bodies(2))
        )
    )
    await api.submit(theirs, tag="pipeline-theirs-1", model=bodies(1)[0]["model"], lines=2)

    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert sorted(r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")) == ["job-0", "job-1"]
    assert "2 result line(s) refused" in summary.message  # theirs, taken for ours and refused
    assert api.cleared == ["batch_2"]  # ours; theirs (batch_1) left to them, not deleted under them
    await run(settings, FakeHost(api))
    assert api.cleared == ["batch_2"]  # nor by a later run


async def test_a_run_interrupted_deletes_no_more_and_leaves_the_rest_to_the_next_run(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    class Refusing(FakeBatchApi):
        refuse = True

        async def clear(self, batch_id: str, files: Collection[str]) -> None:
            if self.refuse:
                raise HTTPStatusError("503 deletes are down", status=503)
            await super().clear(batch_id, files)

    api = Refusing(max_lines=2)
    settings = at_batch_tier(make_settings(server[0], bodies(8)))
    assert (await run(settings, FakeHost(api))).exit_code == 0
    assert _cleared(settings) == [False] * 4  # (a folder of four batches to clear)
    api.refuse = False
    host = FakeHost(api)

    async def interrupted(batch_id: str, files: Collection[str]) -> None:
        assert host.control is not None
        host.control.interrupt()  # Ctrl-C, at the first delete of the next run
        await FakeBatchApi.clear(api, batch_id, files)

    api.clear = interrupted  # type: ignore[method-assign]
    await run(settings, host)
    assert api.cleared == ["batch_1"]  # it was all four: a stopped run went on deleting
    assert _cleared(settings) == [True, False, False, False]


async def test_what_the_provider_acts_on_is_on_the_disk_before_it_is_told(
    make_settings: Callable[..., Settings], server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The ledger commits without syncing its log (a power cut may forget the last commits,
    # which is safe for results: they are asked again). Not so for a batch about to be made
    # (forgotten, it is made and paid twice) or deleted (forgotten as taken, its results are
    # looked for in files gone): the log is on the disk before each such call.
    events: list[str] = []
    fsync = os.fsync

    def synced(fd: int) -> None:
        if os.readlink(f"/proc/self/fd/{fd}").endswith(LEDGER + "-wal"):
            events.append("log synced")
        fsync(fd)

    monkeypatch.setattr(os, "fsync", synced)
    api = FakeBatchApi(max_lines=2)
    step = api._step

    def told(name: str) -> None:
        events.append(name)
        step(name)

    monkeypatch.setattr(api, "_step", told)
    settings = at_batch_tier(make_settings(server[0], bodies(3)))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    shown = " ".join(events)
    made = [i for i, event in enumerate(events) if event == "submit"]
    cleared = [i for i, event in enumerate(events) if event == "clear"]
    assert len(made) == len(cleared) == 2, shown
    for i in made:  # its `creating` commit, just before
        assert events[i - 1] == "log synced", shown
    for i in cleared:  # its `taken` commit, after its lines were read
        read = max(j for j, event in enumerate(events[:i]) if event == "line")
        assert "log synced" in events[read:i], shown


async def test_a_delete_the_provider_keeps_failing_is_given_up_within_a_minute_of_tries() -> None:
    # Housekeeping the next run does again: the run's end does not wait out the retries of a
    # look (eight tries, up to fifteen minutes) on a provider failing its deletes.
    from aiohttp import web

    asked: list[float] = []
    waited: list[float] = []

    async def failing(request: web.Request) -> web.Response:
        asked.append(time.monotonic())
        return web.json_response({"error": {"message": "try later"}}, status=503)

    async def sleep(seconds: float) -> None:
        waited.append(seconds)

    app = web.Application()
    app.router.add_delete("/v1/files/{id}", failing)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with open_batch_api(f"http://127.0.0.1:{port}/v1", None, "files", sleep=sleep) as api:
            with pytest.raises(HTTPStatusError):
                await api.clear("batch_1", ["file-1"])
    finally:
        await runner.cleanup()
    assert len(asked) == 3
    assert sum(waited) <= 60
