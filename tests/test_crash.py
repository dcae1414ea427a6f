"""`pipeline run` killed, interrupted and resumed: every job exactly once, no torn line."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import orjson

from tests.conftest import FAKE_KEY, bodies, read_jsonl, until, write_jsonl


async def start(
    url: str, src: Path, out: Path, *extra: str, preexec_fn: Callable[[], None] | None = None
) -> asyncio.subprocess.Process:
    """`pipeline run` on `src` into `out`, in a process of its own (`preexec_fn` runs in it
    before: to set its limits, say)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline",
        "run",
        "--input",
        str(src),
        "--output",
        str(out),
        "--base-url",
        url,
        "--quiet",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LUMENFALL_API_KEY": FAKE_KEY},
        preexec_fn=preexec_fn,
    )


def whole_lines(path: Path) -> list[dict]:
    """The complete lines of a results file; a crash may have torn the last one."""
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    return [orjson.loads(line) for line in complete.splitlines()]


async def test_kill_9_at_random_moments_then_resume_gives_exactly_once(mock, tmp_path: Path) -> None:
    n = 3000
    src = write_jsonl(tmp_path / "in.jsonl", bodies(n))
    out = tmp_path / "out"
    rng = random.Random(11)
    kills = 0
    async with mock(latency=0.05, record=False) as (url, _server):
        for _ in range(4):
            proc = await start(url, src, out, "--concurrency", "32")
            await asyncio.sleep(rng.uniform(0.6, 1.4))
            if proc.returncode is None:
                proc.kill()
                kills += 1
            await proc.wait()
            ids = Counter(r["custom_id"] for r in whole_lines(out / "results.jsonl"))
            assert not ids or max(ids.values()) == 1
        proc = await start(url, src, out, "--concurrency", "32")
        _stdout, stderr = await proc.communicate()
        assert proc.returncode == 0, stderr.decode()
    assert kills >= 3
    data = (out / "results.jsonl").read_bytes()
    assert data.endswith(b"\n")  # no torn line left
    ids = Counter(r["custom_id"] for r in read_jsonl(out / "results.jsonl"))
    assert len(ids) == n
    assert max(ids.values()) == 1
    assert read_jsonl(out / "errors.jsonl") == []
    usage = orjson.loads((out / "usage.json").read_bytes())
    assert usage["requests"]["succeeded"] == n
    assert len(usage["runs"]) >= 1


async def test_sigint_finishes_what_is_in_flight_and_exits_130(mock, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(200))
    out = tmp_path / "out"
    async with mock(latency=0.3, record=False) as (url, server):
        proc = await start(url, src, out, "--concurrency", "8")
        await until(lambda: sum(server.state.answered.values()) >= 8)  # under way, answers written
        proc.send_signal(signal.SIGINT)
        stdout, stderr = await proc.communicate()
        assert proc.returncode == 130, stderr.decode()
        assert "Traceback" not in stderr.decode()
        done = read_jsonl(out / "results.jsonl")
        # every answer the server gave (and billed) was written: nothing in flight was dropped
        assert len(done) == sum(server.state.answered.values())
        assert 0 < len(done) < 200
        assert (out / "results.jsonl").read_bytes().endswith(b"\n")
        assert b"interrupted" in stdout
        proc = await start(url, src, out, "--concurrency", "64")
        await proc.communicate()
        assert proc.returncode == 0
    ids = Counter(r["custom_id"] for r in read_jsonl(out / "results.jsonl"))
    assert len(ids) == 200
    assert max(ids.values()) == 1


async def test_sigterm_is_an_interrupt_too(mock, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(100))
    async with mock(latency=0.2, record=False) as (url, server):
        proc = await start(url, src, tmp_path / "out", "--concurrency", "4")
        await until(lambda: server.state.in_flight > 0)  # under way: it listens for signals
        proc.send_signal(signal.SIGTERM)
        await proc.communicate()
    assert proc.returncode == 130


async def test_a_second_sigint_cancels_what_is_in_flight_at_once(mock, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(20))
    out = tmp_path / "out"
    async with mock(latency=30.0, record=False) as (url, server):
        proc = await start(url, src, out, "--concurrency", "4")
        await until(lambda: server.state.in_flight == 4)
        proc.send_signal(signal.SIGINT)
        await asyncio.sleep(0.5)
        assert proc.returncode is None  # waiting for the four in flight
        began = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = await proc.communicate()
        assert time.monotonic() - began < 5
    assert proc.returncode == 130, stderr.decode()
    assert "Traceback" not in stderr.decode()
    assert read_jsonl(out / "results.jsonl") == []
    usage = orjson.loads((out / "usage.json").read_bytes())
    assert usage["runs"][-1]["pending"] == 20
