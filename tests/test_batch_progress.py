"""What a person sees while a batch run waits on its batches: the bar moves with the lines the
provider says are answered, the batches by state and how long they have waited, on a terminal
and in the log line of a run without one. A fake clock: no test waits."""

from __future__ import annotations

import io
import os
import select
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pipeline.account.usage import Usage
from pipeline.batch import intake as intake_module
from pipeline.batch.follow import Follower
from pipeline.input.reader import ReadCounts
from pipeline.run.control import Control
from pipeline.run.progress import Progress
from pipeline.run.runner import run
from pipeline.send.batchapi import BatchCounts, BatchInfo
from pipeline.settings import Settings, build
from tests.conftest import bodies
from tests.fakebatchapi import FakeBatchApi, FakeClock, FakeHost, at_batch_tier, stopping_at_a_look


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Written:
    written = 0


class _Watched(FakeHost):
    progress: Progress | None = None

    async def watch(self, control: Control, progress: Progress) -> None:
        self.control, self.progress = control, progress


def _follower(clock: FakeClock, writer: _Written) -> Follower:
    return Follower(
        api=FakeBatchApi(),
        book=None,  # type: ignore[arg-type]
        intake=SimpleNamespace(writer=writer),  # type: ignore[arg-type]
        control=Control(),
        clock=clock,
        poll=30.0,
        give_up=600.0,
        commit=lambda: True,
        say=print,
    )


def test_the_status_names_the_batches_by_state_with_their_counts_and_wait() -> None:
    clock = FakeClock()
    follower = _follower(clock, _Written())
    assert follower.status() == "staging batches"
    follower.running(1, BatchInfo("b1", "in_progress", BatchCounts(100, 40, 2)))
    follower.running(2, BatchInfo("b2", "validating", BatchCounts(50)))
    follower.running(3, BatchInfo("b3", "in_progress", BatchCounts(200, 10, 0)))
    follower.queue.append(4)
    clock.t += 725
    assert follower.status() == ("3 batches: 1 validating, 2 in progress 52/300; waiting 12m05s; 1 to submit")
    follower.due.pop(2)
    follower.queue.clear()
    assert follower.status() == "2 batches in progress 52/300; waiting 12m05s"
    follower.staging_done()
    follower.due.clear()
    assert follower.status() == "no batch running"


def test_the_bar_moves_with_the_lines_the_provider_answered_and_counts_none_twice(tmp_path: Path) -> None:
    clock, writer = FakeClock(), _Written()
    follower = _follower(clock, writer)
    settings = build(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o"), tier="batch")
    stream = _Terminal()
    progress = Progress(settings, ReadCounts(total=250), writer, Usage(), stream=stream)  # type: ignore[arg-type]
    progress.batches = follower
    follower.running(1, BatchInfo("b1", "validating", BatchCounts(100)))
    follower.running(2, BatchInfo("b2", "validating", BatchCounts(150)))
    progress._refresh_bar()
    # Nothing done yet, but the batches' states are drawn (tqdm draws nothing on update(0)).
    assert "2 batches validating" in stream.getvalue()
    follower.seen[1] = BatchInfo("b1", "completed", BatchCounts(100, 97, 3))
    follower.seen[2] = BatchInfo("b2", "in_progress", BatchCounts(150, 50, 0))
    progress._refresh_bar()
    bar = progress.bar
    assert bar is not None
    assert (bar.n, bar.total) == (150, 250)
    # Batch 1 is being taken in: 60 of its lines written so far count once, not twice.
    follower.taking = (1, writer.written)
    writer.written += 60
    progress._refresh_bar()
    assert bar.n == 150
    # Its download cut short there, it waits to be taken again: still counted once.
    follower.taking = None
    follower.written_of[1] = 60
    progress._refresh_bar()
    assert bar.n == 150
    progress.close()


def test_the_log_line_without_a_terminal_gives_the_same_figures(tmp_path: Path) -> None:
    clock, writer = FakeClock(), _Written()
    follower = _follower(clock, writer)
    settings = build(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o"), tier="batch")
    progress = Progress(settings, ReadCounts(total=400, skipped=100), writer, Usage(), stream=io.StringIO())  # type: ignore[arg-type]
    progress.batches = follower
    writer.written = 20
    follower.running(1, BatchInfo("b1", "in_progress", BatchCounts(200, 80, 0)))
    clock.t += 7980
    line = progress.line()
    assert line.startswith("pipeline: 200 of 400 done (50%) | 1 batch in progress 80/200; waiting 2h13m |")
    assert line.endswith("| 0 failed | 0 tokens | $0.0000")  # nothing answered yet: nothing spent
    assert "req/s" not in line  # no rate nor time left drawn from a provider's answering
    assert "left" not in line


async def test_a_batch_an_earlier_run_submitted_has_waited_since_its_submission(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(looks_to_end=3)
    settings = at_batch_tier(make_settings(server[0], bodies(3)))
    first = stopping_at_a_look(api)
    assert (await run(settings, first)).exit_code == 130
    second = _Watched(api)
    second.batch_clock.t += 2 * 3600  # the next morning's run, two hours on
    seen: list[str] = []

    def look() -> None:
        assert second.progress is not None
        assert second.progress.batches is not None
        seen.append(second.progress.batches.status())

    api.on_get = look
    summary = await run(settings, second)
    assert summary.exit_code == 0, summary.message
    assert seen[0] == "1 batch submitted; waiting 2h00m"


async def test_a_batch_whose_download_was_cut_is_counted_once_until_taken_again(
    make_settings: Callable[..., Settings], server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intake_module, "WRITE_EVERY", 2)  # the first lines written before the cut
    monkeypatch.setattr(intake_module, "READ_EVERY", 2)
    api = FakeBatchApi()
    api.cut_at = 4
    settings = at_batch_tier(make_settings(server[0], bodies(6)))
    host = _Watched(api)
    done: list[int] = []

    def look() -> None:
        assert host.progress is not None
        done.append(host.progress._now())

    api.on_get = look
    summary = await run(settings, host)
    assert summary.exit_code == 0, summary.message
    assert api.cut_at is None  # the cut happened, and the batch was looked at again after it
    assert len(done) == 2
    assert done[1] == 6  # its lines written before the cut, and the provider's count of them: once


def test_a_terminal_that_says_no_size_still_gets_a_bar(tmp_path: Path) -> None:
    """A pty nobody sized (`script`, a CI runner's, `docker exec -t`) says it is 0 by 0: tqdm
    drew nothing at all there, for the whole run."""
    master, slave = os.openpty()  # (a new pty: 0 columns, 0 rows)
    try:
        with open(slave, "w", closefd=True) as terminal:
            assert terminal.isatty()
            assert os.get_terminal_size(terminal.fileno()).columns == 0
            clock, writer = FakeClock(), _Written()
            follower = _follower(clock, writer)
            settings = build(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o"), tier="batch")
            progress = Progress(settings, ReadCounts(total=300), writer, Usage(), stream=terminal)  # type: ignore[arg-type]
            progress.batches = follower
            follower.running(1, BatchInfo("b1", "in_progress", BatchCounts(300, 120, 0)))
            progress._refresh_bar()
            progress._refresh_bar()  # (drawn now: tqdm's update draws 0.1 s after the last only)
            terminal.flush()
            drawn = b""
            while b"in progress" not in drawn and select.select([master], [], [], 2)[0]:
                drawn += os.read(master, 65536)
            progress.close()
    finally:
        os.close(master)
    assert b"120/300" in drawn
    assert b"1 batch in progress 120/300" in drawn
