"""Following many batches through the endpoint's list of batches (`BatchApi.page`, `batch.sweep`):
each found ended within a poll of its end, however many run, at one call a second; and the
client's page, both shapes, against a batch API of the test's own."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from pipeline.run.runner import run
from pipeline.send.batchapi import BatchCounts, BatchInfo, BatchPage
from pipeline.settings import Settings
from tests.batchfake import fake_batches
from tests.conftest import bodies, read_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeClock, FakeHost, at_batch_tier
from tests.test_batch_client import opened, staged


class TimedApi(FakeBatchApi):
    """Batches that end `takes` seconds after they are made, on the run's clock, listed
    `per_page` a page (`lists` False: no list)."""

    def __init__(self, clock: FakeClock, *, takes: float, per_page: int = 100, lists: bool = True) -> None:
        super().__init__(max_lines=1)
        self.clock, self.takes, self.per_page, self.lists = clock, takes, per_page, lists
        self.made_at: dict[str, float] = {}
        self.calls: Counter[str] = Counter()
        self.call_times: list[float] = []
        self.late: dict[str, float] = {}  # batch -> seconds from its end to the look that saw it

    async def submit(self, staged: Path, *, tag: str, model: str, lines: int) -> BatchInfo:
        info = await super().submit(staged, tag=tag, model=model, lines=lines)
        self.made_at[info.id] = self.clock.now()
        return info

    def _now(self, batch_id: str) -> BatchInfo:
        batch = self.batches[batch_id]
        end = self.made_at[batch_id] + self.takes
        if not batch.info.ended and self.clock.now() >= end:
            total = len(batch.lines)
            batch.info = batch.info._replace(status="completed", counts=BatchCounts(total, total, 0))
            self.late[batch_id] = self.clock.now() - end
        return batch.info

    def _call(self, name: str) -> None:
        self.calls[name] += 1
        self.call_times.append(self.clock.now())

    async def get(self, batch_id: str) -> BatchInfo:
        self._call("get")
        await anyio.lowlevel.checkpoint()
        return self._now(batch_id)

    async def page(self, after: str | None = None) -> BatchPage | None:
        self._call("page")
        await anyio.lowlevel.checkpoint()
        if not self.lists:
            return None
        newest = list(reversed(self.batches))
        start = newest.index(after) + 1 if after else 0
        ids = newest[start : start + self.per_page]
        more = start + self.per_page < len(newest)
        oldest = self.clock.wall() - self.clock.now() + self.made_at[ids[-1]] if ids else None
        return BatchPage(tuple(self._now(i) for i in ids), ids[-1] if more and ids else None, oldest)


async def _followed(
    make_settings: Callable[..., Settings], url: str, *, lines: int, **options: Any
) -> TimedApi:
    clock = FakeClock()
    api = TimedApi(clock, takes=1000.0, **options)
    host = FakeHost(api)
    host.batch_clock = clock
    # Time stands still until the input is staged whole: staged at the machine's speed (slow
    # under load) while the follower's fake seconds ran on, each batch ran alone, its looks
    # each its own, and a test of twenty running at once failed one time in twenty.
    clock.held = host.staging
    rows = bodies(lines)
    settings = at_batch_tier(make_settings(url, rows), batch_poll=2.0)
    summary = await run(settings, host)
    assert summary.exit_code == 0, summary.message
    assert sorted(r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")) == sorted(
        r["custom_id"] for r in rows
    )
    assert set(api.ran.values()) == {1}
    assert len(api.late) == lines  # (one a line: max_lines=1)
    gaps = [b - a for a, b in zip(api.call_times, api.call_times[1:], strict=False)]
    assert min(gaps) >= 1.0  # one call a second at most, in all
    return api


@pytest.mark.parametrize(("per_page", "late"), [(100, 3.0), (6, 6.0)])
async def test_twenty_batches_are_each_found_ended_within_a_poll_through_the_list(
    make_settings: Callable[..., Settings], server: tuple[str, Any], per_page: int, late: float
) -> None:
    # Looked at one a second, one batch a look, the last of twenty was found 20 s late.
    api = await _followed(make_settings, server[0], lines=20, per_page=per_page)
    assert max(api.late.values()) <= late  # the poll (2 s), and a sweep of the pages (1 s each)
    assert api.calls["page"] > api.calls["get"]  # (a batch running alone is looked at alone)


async def test_an_endpoint_without_a_list_is_followed_a_batch_a_look(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = await _followed(make_settings, server[0], lines=20, lists=False)
    assert api.calls["page"] == 1  # asked once, and not again
    assert api.calls["get"] >= 20  # each batch looked at alone, as every endpoint was followed before


@pytest.mark.parametrize("shape", ["files", "inline"])
async def test_a_page_describes_the_batches_as_a_look_at_each_would(tmp_path: Path, shape: str) -> None:
    async with fake_batches(shape) as fake, opened(fake) as api:
        made = [
            await api.submit(staged(tmp_path, 2, name=f"{i}.jsonl"), tag=f"t{i}", model="test/model", lines=2)
            for i in range(3)
        ]
        fake.finish(made[0].id)
        fake.finish(made[1].id, "failed")  # no reason given: looked at alone
        first = await api.page()
        assert first is not None
        second = await api.page(made[1].id)  # (the cursor: the last id of the page before)
        assert second is not None
        looked = [await api.get(info.id) for info in (made[2], made[0])]
    assert [info.id for info in first.batches] == [made[2].id, made[0].id]
    assert list(first.batches) == looked
    assert (first.batches[1].status, first.batches[1].counts.total) == ("completed", 2)
    assert first.after is None  # the list ends there
    assert [info.id for info in second.batches] == [made[0].id]


@pytest.mark.parametrize(("takes", "seen"), [(2.0, 2.0), (10.0, 16.0), (3600.0, 3602.0)])
async def test_a_batch_is_first_looked_at_soon_and_then_a_poll_apart(
    make_settings: Callable[..., Settings], server: tuple[str, Any], takes: float, seen: float
) -> None:
    # One that fails validation in 2 s, or is done in 10, was first looked at 30 s after its
    # submission (the poll); looked at as long as it has run, it is seen at 2 s, or 16.
    clock = FakeClock()
    api = TimedApi(clock, takes=takes)
    host = FakeHost(api)
    host.batch_clock = clock
    settings = at_batch_tier(make_settings(server[0], bodies(1)), batch_poll=30.0)
    summary = await run(settings, host)
    assert summary.exit_code == 0, summary.message
    made = api.made_at["batch_1"]
    looks = [t - made for t in api.call_times]
    assert looks[-1] == pytest.approx(seen)
    if takes > 60:  # steady: a poll apart once it has run a poll, as many looks as before
        assert looks[:5] == pytest.approx([2.0, 4.0, 8.0, 16.0, 32.0])
        assert {round(b - a, 6) for a, b in itertools.pairwise(looks[4:])} == {30.0}
