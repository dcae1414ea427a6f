"""The batch tier end to end through `pipeline.run`, against a fake batch API in memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.run.runner import run
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeHost, at_batch_tier


async def test_every_line_lands_once_through_batches_cut_at_the_api_limit(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(max_lines=4)
    rows = bodies(10) + bodies(3, model="other/model", start=10)
    settings = at_batch_tier(make_settings(server[0], rows))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    results = read_jsonl(settings.folder / "results.jsonl")
    assert sorted(r["custom_id"] for r in results) == sorted(r["custom_id"] for r in rows)
    assert api.made == 4  # 10 lines of one model at 4 a batch, 3 of the other
    assert set(api.ran.values()) == {1}
    assert not list((settings.folder / "batches").iterdir())  # staged files gone once taken
