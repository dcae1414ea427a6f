"""A batch's result lines looked up in the book a run at a time (`Book.looked_up`): a second
line for an id is refused however far from the first it comes, in the same run of lines or
in a later one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from pipeline.batch.intake import READ_EVERY
from pipeline.run.runner import run
from pipeline.send.batchapi import BatchInfo
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeHost, at_batch_tier


class Echoed(FakeBatchApi):
    """Every answer, then the first one's again, a run of lines later."""

    async def results(self, info: BatchInfo) -> AsyncIterator[bytes]:
        first: bytes | None = None
        async for line in super().results(info):
            first = first or line
            yield line
        assert first is not None
        yield first


async def test_a_second_line_for_an_id_a_run_of_lines_later_is_refused(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    rows = bodies(READ_EVERY + 10)
    api = Echoed(max_lines=len(rows))
    settings = at_batch_tier(make_settings(server[0], rows))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert "1 result line(s) refused" in summary.message
    ids = [r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")]
    assert sorted(ids) == sorted(r["custom_id"] for r in rows)  # each once
