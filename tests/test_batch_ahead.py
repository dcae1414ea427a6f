"""A batch's result lines read ahead of their judging (`batch.ahead`): fetched while the runs
before are judged, never further ahead than its bound, and a failure to read raised where the
runs are read, after those read before it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import pytest

from pipeline.batch.ahead import read_ahead
from pipeline.errors import ConnectionDropped


class Lines:
    """`count` lines, then a dropped connection where `cut`; how many were read, and whether
    the reading was closed."""

    def __init__(self, count: int, *, cut: bool = False) -> None:
        self.count, self.cut = count, cut
        self.read = 0
        self.closed = False

    async def lines(self) -> AsyncIterator[bytes]:
        try:
            for i in range(self.count):
                self.read += 1
                await anyio.lowlevel.checkpoint()
                yield b"%d" % i
            if self.cut:
                raise ConnectionDropped("the download was cut")
        finally:
            self.closed = True


async def test_the_next_runs_are_read_while_one_is_judged_and_no_further() -> None:
    source = Lines(100)
    async with read_ahead(source.lines(), per=5, runs=2) as runs:
        got = [await runs.__anext__()]
        await anyio.wait_all_tasks_blocked()  # the judge at work: the reader runs meanwhile
        assert 5 + 2 * 5 <= source.read <= 5 + 2 * 5 + 5  # read ahead, within its bound
        got += [run async for run in runs]
    assert [line for run in got for line in run] == [b"%d" % i for i in range(100)]
    assert all(len(run) == 5 for run in got)


async def test_a_failure_to_read_comes_after_the_runs_before_it() -> None:
    source = Lines(12, cut=True)
    got: list[list[bytes]] = []

    async def judge() -> None:
        async with read_ahead(source.lines(), per=5) as runs:
            async for run in runs:
                got.append(run)

    with pytest.raises(ConnectionDropped):
        await judge()
    assert got == [[b"%d" % i for i in range(5)], [b"%d" % i for i in range(5, 10)]]


async def test_a_judge_that_stops_early_leaves_the_rest_unread() -> None:
    source = Lines(1000)
    async with read_ahead(source.lines(), per=5, runs=2) as runs:
        async for _ in runs:
            break
    assert source.closed
    assert source.read < 30


async def test_the_judges_own_failure_is_raised_as_it_came() -> None:
    async def judge() -> None:
        async with read_ahead(Lines(10).lines(), per=5) as runs:
            async for _ in runs:
                raise KeyError("judged wrong")

    with pytest.raises(KeyError):  # (not in a group of the reader task's)
        await judge()


async def test_the_next_page_is_asked_for_as_soon_as_a_page_is_in() -> None:
    """A page of results in hand is put into runs at once and the next page asked for, while
    the judge takes the first run: the next page comes while this one is judged, not after."""
    asked: list[int] = []

    async def pages() -> AsyncIterator[bytes]:
        for page in range(4):
            asked.append(page)
            await anyio.lowlevel.checkpoint()  # (the page's request, answered)
            for i in range(10):
                yield b"%d" % (10 * page + i)

    async with read_ahead(pages(), per=5, runs=4) as runs:
        first = await runs.__anext__()
        assert asked == [0, 1]  # the first run judged while the second page is on its way
        rest = [run async for run in runs]
    assert [line for run in [first, *rest] for line in run] == [b"%d" % i for i in range(40)]
