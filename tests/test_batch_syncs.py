"""What a batch's taking in costs besides its lines: the results synced to the disk once a
batch, before the commit that takes it, and not once more at its start when the writer has
nothing unwritten (the inline shape pays that cost every 5,000 lines)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pipeline.batch.intake import Intake
from pipeline.output.writer import Writer
from pipeline.run.runner import run
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeHost, at_batch_tier


async def test_a_batch_taken_in_syncs_its_results_once(
    make_settings: Callable[..., Settings], server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[int] = []  # the files' syncs in each take
    taking = False
    sync, take = Writer._sync_files, Intake.take

    def counted_sync(self: Writer) -> None:
        if taking:
            synced[-1] += 1
        sync(self)

    async def counted_take(self: Intake, *args: Any, **kwargs: Any) -> Any:
        nonlocal taking
        synced.append(0)
        taking = True
        try:
            return await take(self, *args, **kwargs)
        finally:
            taking = False

    monkeypatch.setattr("pipeline.output.writer.SYNC_EVERY", 3600.0)  # (no sync by the clock)
    monkeypatch.setattr(Writer, "_sync_files", counted_sync)
    monkeypatch.setattr(Intake, "take", counted_take)
    rows = bodies(12)
    settings = at_batch_tier(make_settings(server[0], rows))
    summary = await run(settings, FakeHost(FakeBatchApi(max_lines=3)))
    assert summary.exit_code == 0, summary.message
    ids = [r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")]
    assert sorted(ids) == sorted(r["custom_id"] for r in rows)
    assert synced == [1, 1, 1, 1]
