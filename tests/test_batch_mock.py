"""The batch tier end to end against the built-in mock's batch APIs, both shapes, through the
batch client: every line once in the files, and the mock's own counts (GET /mock/stats) show
that no batch was made twice for a tag and no line answered twice, a kill between making a
batch and noting its id included."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pipeline.run.host import Host
from pipeline.run.runner import run
from pipeline.send import batchclient
from pipeline.send.batchapi import BatchApi, BatchInfo
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl
from tests.fakebatchapi import FakeClock, Killed, at_batch_tier

MAX_LINES = 4


class KillAfterMaking:
    """The client, killed once a batch is made and before its id reaches the run."""

    def __init__(self, api: BatchApi) -> None:
        self.api = api
        self.kill = True

    def __getattr__(self, name: str) -> Any:  # (the rest of the client, as it is)
        return getattr(self.api, name)

    async def submit(self, staged: Path, *, tag: str, model: str, lines: int) -> BatchInfo:
        info = await self.api.submit(staged, tag=tag, model=model, lines=lines)
        if self.kill:
            self.kill = False
            raise Killed("after the batch was made")
        return info


class MockHost(Host):
    def __init__(self, kill: bool = False) -> None:
        self.batch_clock = FakeClock()
        self.kill = kill

    def batch_api(
        self, settings: Settings, api_key: str | None
    ) -> contextlib.AbstractAsyncContextManager[BatchApi]:
        @contextlib.asynccontextmanager
        async def opened() -> AsyncIterator[BatchApi]:
            shape = settings.batch_api
            async with batchclient.open_batch_api(
                settings.base_url, api_key, shape, max_lines=MAX_LINES
            ) as api:
                yield KillAfterMaking(api) if self.kill else api  # type: ignore[misc]

        return opened()


async def _stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url.rsplit("/v1", 1)[0] + "/mock/stats") as r:
        stats: dict[str, Any] = await r.json()
        return stats["batch"]


@pytest.mark.parametrize("shape", ["files", "inline"])
async def test_both_shapes_land_every_line_once_and_nothing_twice_even_killed_after_a_batch_is_made(
    mock: Callable[..., Any], make_settings: Callable[..., Settings], shape: str
) -> None:
    rows = bodies(9) + bodies(3, model="other/model", start=9)
    rows[2]["messages"][0]["content"] = "fail_me please"  # a 400 in the error file: a failure
    async with mock(batch_api=shape, batch_max_lines=MAX_LINES, batch_fail_rate=0.2) as (url, _):
        settings = at_batch_tier(make_settings(url, rows, max_attempts=5), batch_api=shape)
        with pytest.raises(BaseException) as killed:  # noqa: PT011 -- a kill, by any path out
            await run(settings, MockHost(kill=True))
        assert "after the batch was made" in repr(killed.value)
        summary = await run(settings, MockHost())
        assert summary.exit_code == 1, summary.message
        results = read_jsonl(settings.folder / "results.jsonl")
        errors = read_jsonl(settings.folder / "errors.jsonl")
        ids = sorted([r["custom_id"] for r in results] + [e["custom_id"] for e in errors])
        assert ids == sorted(r["custom_id"] for r in rows)
        assert [e["custom_id"] for e in errors] == ["job-2"]
        assert errors[0]["response"]["status_code"] == 400
        stats = await _stats(url)
        assert stats["tags_twice"] == 0  # the batch made before the kill was found, not made again
        assert stats["lines_answered_twice"] == 0
        assert summary.usage["cost"]["total"] > 0


async def test_an_endpoint_without_batches_is_exit_2_before_anything_is_uploaded(
    mock: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    from pipeline.errors import SettingsError

    async with mock(batch_api="none") as (url, _):
        settings = at_batch_tier(make_settings(url, bodies(3)))
        with pytest.raises(SettingsError, match=r"no batch API.*--tier sync"):
            await run(settings, MockHost())


class InterruptAtFirstLook(MockHost):
    """A run stopped (as by Ctrl-C) at its first look at a batch, which is left running."""

    def __init__(self) -> None:
        super().__init__()
        self.control: Any = None

    async def watch(self, control: Any, progress: Any) -> None:
        self.control = control

    def batch_api(
        self, settings: Settings, api_key: str | None
    ) -> contextlib.AbstractAsyncContextManager[BatchApi]:
        opened = super().batch_api(settings, api_key)
        host = self

        class Stopping:
            def __init__(self, api: BatchApi) -> None:
                self.api = api

            def __getattr__(self, name: str) -> Any:
                return getattr(self.api, name)

            async def get(self, batch_id: str) -> BatchInfo:
                host.control.interrupt()
                return await self.api.get(batch_id)

        @contextlib.asynccontextmanager
        async def stopping() -> AsyncIterator[BatchApi]:
            async with opened as api:
                yield Stopping(api)  # type: ignore[misc]

        return stopping()


async def test_cancel_reaches_the_endpoint_the_folders_batches_went_to_without_being_told(
    mock: Callable[..., Any], make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    import anyio

    from pipeline.batch import cancel

    monkeypatch.setattr(cancel, "LOOK_EVERY", 0.01)
    async with mock(batch_api="inline", batch_max_lines=MAX_LINES, batch_seconds=3600) as (url, _):
        settings = at_batch_tier(make_settings(url, bodies(3)), batch_api="inline")
        summary = await run(settings, InterruptAtFirstLook())
        assert summary.exit_code == 130, summary.message
        assert "pipeline cancel" in summary.message
        # As the note says, no job file and no --base-url: the folder knows where its batches are.
        status = await anyio.to_thread.run_sync(cancel.cancel_folder, settings.folder)
        assert status == 0
        assert (await _stats(url))["cancels"] == 1


async def test_cancel_of_a_folder_of_shards_cancels_every_shards_batches(
    mock: Callable[..., Any], make_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards run at the batch tier each keep their batches in their own folder: `pipeline
    cancel OUT` said OUT held no run, nothing to cancel, while the shards' batches ran on."""
    import anyio

    from pipeline.batch import cancel

    monkeypatch.setattr(cancel, "LOOK_EVERY", 0.01)
    async with mock(batch_seconds=3600) as (url, _):
        for k in (1, 2):
            settings = at_batch_tier(make_settings(url, bodies(6), shard=f"{k}/2"))
            summary = await run(settings, InterruptAtFirstLook())
            assert summary.exit_code == 130, summary.message
        status = await anyio.to_thread.run_sync(cancel.cancel_folder, settings.folder.parent)
        assert status == 0
        assert (await _stats(url))["cancels"] == 2
