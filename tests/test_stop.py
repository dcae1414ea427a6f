"""A stop that answers: the first Ctrl-C says at once what happens now, and a run with nothing
in flight exits within two seconds, whatever its workers were waiting on. Each test is a real
`pipeline run` and a real SIGINT."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import orjson
import pytest

from pipeline.pace.pacer import Pacer
from pipeline.pace.window import Window
from pipeline.run.control import Control
from pipeline.run.summary import EXIT_INTERRUPTED, EXIT_OK, exit_status
from tests.conftest import bodies, read_jsonl, until, write_jsonl
from tests.test_crash import start

QUICK = 2.0  # seconds a stop may take with nothing in flight


async def interrupt(proc: asyncio.subprocess.Process) -> tuple[float, str]:
    """SIGINT; returns how long the run took to exit, and what it said on stderr."""
    assert proc.stderr is not None
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    said = (await asyncio.wait_for(proc.stderr.readline(), timeout=QUICK)).decode()
    await proc.wait()
    return time.monotonic() - began, said


async def stopped_while_waiting(
    mock_config: dict, tmp_path: Path, *flags: str, rows: int = 20, settle: float = 0.5
) -> tuple[float, str, int, dict]:
    from pipeline.mock.config import MockConfig
    from pipeline.mock.hosting import start_mock

    src = write_jsonl(tmp_path / "in.jsonl", bodies(rows))
    out = tmp_path / "out"
    async with start_mock(MockConfig(**mock_config)) as (url, server):
        proc = await start(url, src, out, *flags)
        # The first answer made, and nothing left at the mock: from then on every request waits
        # on the client (a pace, a backoff, the budget). A fixed time from the start was not
        # always enough, on a loaded machine, for the first request to be answered at all.
        state, began = server.state, time.monotonic()
        while not (state.statuses and state.in_flight == 0):
            assert time.monotonic() - began < 30, "the run sent nothing"
            await asyncio.sleep(0.01)
        await asyncio.sleep(settle)  # long enough to be waiting, far short of the wait
        assert proc.returncode is None
        took, said = await interrupt(proc)
    usage = orjson.loads((out / "usage.json").read_bytes())
    return took, said, proc.returncode or 0, usage


async def test_a_stop_during_a_pool_wide_pause_is_quick(tmp_path: Path) -> None:
    # Every request refused with Retry-After: 60: a run of refusals pauses the whole pool.
    took, said, code, usage = await stopped_while_waiting(
        {"script": [429] * 100, "retry_after": 60.0}, tmp_path, "--concurrency", "8"
    )
    assert "nothing is in flight" in said
    assert took < QUICK
    assert code == EXIT_INTERRUPTED
    assert usage["runs"][-1]["pending"] == 20
    assert usage["runs"][-1]["rate_cuts"] >= 1  # it was the pool-wide pause that waited


async def test_a_stop_while_the_pacer_spaces_requests_is_quick(tmp_path: Path) -> None:
    took, said, code, usage = await stopped_while_waiting({}, tmp_path, "--rpm", "6", "--concurrency", "8")
    assert "nothing is in flight" in said
    assert took < QUICK
    assert code == EXIT_INTERRUPTED
    assert usage["runs"][-1]["succeeded"] == 1  # the first went at once; the next was 10 s away


async def test_a_stop_during_a_backoff_is_quick(tmp_path: Path) -> None:
    took, said, code, _ = await stopped_while_waiting(
        {"script": [503], "retry_after": 60.0}, tmp_path, "--concurrency", "1", rows=1
    )
    assert "nothing is in flight" in said
    assert took < QUICK
    assert code == EXIT_INTERRUPTED


async def test_a_stop_while_the_budget_learns_a_models_cost_is_quick(tmp_path: Path) -> None:
    # No price and no cost reported: one request goes alone to learn the cost, and it is
    # backing off from a 503; every other one waits for what it learns.
    took, said, code, _ = await stopped_while_waiting(
        {"script": [503], "retry_after": 60.0, "cost": False},
        tmp_path,
        "--max-cost",
        "5",
        "--concurrency",
        "8",
    )
    assert "nothing is in flight" in said
    assert took < QUICK
    assert code == EXIT_INTERRUPTED


async def test_a_stop_while_the_reader_waits_on_a_pipe_is_quick(tmp_path: Path) -> None:
    from pipeline.mock.config import MockConfig
    from pipeline.mock.hosting import start_mock

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "out"
    async with start_mock(MockConfig()) as (url, server):
        proc = await start(url, fifo, out)
        writer = await asyncio.to_thread(os.open, fifo, os.O_WRONLY)  # opens once the run reads it
        try:
            os.write(writer, b"".join(orjson.dumps(b) + b"\n" for b in bodies(3)))
            for _ in range(100):  # until the three are answered; the pipe stays open
                if sum(server.state.answered.values()) == 3:
                    break
                await asyncio.sleep(0.05)
            took, said = await interrupt(proc)
        finally:
            os.close(writer)
    assert "nothing is in flight" in said
    assert took < QUICK
    assert proc.returncode == EXIT_INTERRUPTED  # more might have come down the pipe
    assert len(read_jsonl(out / "results.jsonl")) == 3


async def test_the_first_ctrl_c_says_how_many_are_in_flight_and_what_a_second_does(tmp_path: Path) -> None:
    from pipeline.mock.config import MockConfig
    from pipeline.mock.hosting import start_mock

    src = write_jsonl(tmp_path / "in.jsonl", bodies(20))
    async with start_mock(MockConfig(latency=30.0)) as (url, server):
        proc = await start(url, src, tmp_path / "out", "--concurrency", "4")
        await until(lambda: server.state.in_flight == 4)
        assert proc.stderr is not None
        proc.send_signal(signal.SIGINT)
        said = (await asyncio.wait_for(proc.stderr.readline(), timeout=QUICK)).decode()
        assert "4 requests in flight" in said
        assert "within 30s" in said
        assert "Ctrl-C again" in said
        proc.send_signal(signal.SIGINT)
        said = (await asyncio.wait_for(proc.stderr.readline(), timeout=QUICK)).decode()
        assert "cancelling 4 requests" in said
        await asyncio.wait_for(proc.wait(), timeout=QUICK)
    assert proc.returncode == EXIT_INTERRUPTED


async def test_waiters_of_the_window_and_the_pacer_wake_when_the_run_stops() -> None:
    control = Control()
    window, pacer = Window(2, ramp=0), Pacer(request_rate=0.01)
    control.on_stop += [window.wake_all, pacer.wake_all]
    await window.acquire()
    await window.acquire()
    await pacer.acquire()  # the first goes at once; the next would wait 100 s
    waiting = [asyncio.ensure_future(window.acquire()), asyncio.ensure_future(pacer.acquire())]
    await asyncio.sleep(0)
    assert not any(w.done() for w in waiting)
    control.interrupt()
    await asyncio.wait_for(asyncio.gather(*waiting), timeout=1.0)
    assert not control.dispatching


@pytest.mark.parametrize(
    ("pending", "code"),
    [(0, EXIT_OK), (1, EXIT_INTERRUPTED), (None, EXIT_INTERRUPTED)],
)
def test_a_run_interrupted_with_nothing_left_pending_is_a_success(pending: int | None, code: int) -> None:
    control = Control()
    control.interrupt()
    assert exit_status(control, pending=pending, failed_now=0, errors_file=Path("errors.jsonl"))[0] == code
