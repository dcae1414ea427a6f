"""Stalls cut, long answers kept: a stream is bounded by an idle timeout, never by a total;
an answer that is not streamed by a total that fits long answers; and the open-file limit a
high concurrency needs."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import orjson

import pipeline
from pipeline.mock.answers import job_key
from pipeline.run.preflight import raise_open_files
from tests.conftest import bodies, read_jsonl, write_jsonl
from tests.test_crash import start


def streamed(n: int) -> list[dict]:
    return [body | {"stream": True} for body in bodies(n)]


async def test_stalled_streams_are_cut_after_the_idle_timeout_and_retried(
    mock, make_settings, tmp_path: Path
) -> None:
    rows = streamed(100)
    stalling = sum(int(job_key(r)[:8], 16) / 2**32 < 0.05 for r in rows)
    assert stalling >= 2  # (the mock picks a job's first stream by its messages)
    async with mock(stall_rate=0.05, latency=0.05, record=False) as (url, server):
        began = time.monotonic()
        summary = await pipeline.run(make_settings(url, rows, idle_timeout=1.0, concurrency=32))
        took = time.monotonic() - began
    assert summary.exit_code == 0
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) == 100
    assert server.state.statuses["stall"] == stalling
    assert took < 1.0 + 3.0  # one idle timeout, then the retry
    usage = orjson.loads((tmp_path / "out/usage.json").read_bytes())
    assert usage["answers_by_status"]["connection_error"] == stalling


async def test_a_long_stream_that_keeps_arriving_is_never_cut(mock, make_settings, tmp_path: Path) -> None:
    # Chunks every 0.4 s for longer than both timeouts, after 1.5 s of keep-alive comments
    # only (a reasoning model): bytes keep coming, so nothing is cut.
    async with mock(chunk_delay=0.4, think=1.5) as (url, server):
        began = time.monotonic()
        summary = await pipeline.run(make_settings(url, streamed(3), idle_timeout=0.6, timeout=1.0))
        took = time.monotonic() - began
    assert summary.exit_code == 0
    assert len(server.state.received) == 3  # each sent once
    assert took > 1.5 + 0.4 * 3  # it did take longer than either timeout
    results = read_jsonl(tmp_path / "out/results.jsonl")
    assert all(r["response"]["body"]["choices"][0]["message"]["content"] for r in results)


async def test_an_answer_that_is_not_streamed_is_cut_by_the_total_timeout(
    mock, make_settings, tmp_path: Path
) -> None:
    async with mock(script=["timeout"]) as (url, server):
        began = time.monotonic()
        summary = await pipeline.run(make_settings(url, bodies(1), timeout=0.3, idle_timeout=60.0))
        took = time.monotonic() - began
    assert took < 3  # cut at 0.3 s, not at the idle timeout's 60
    assert summary.exit_code == 0
    assert len(server.state.received) == 2
    usage = orjson.loads((tmp_path / "out/usage.json").read_bytes())
    assert usage["answers_by_status"] == {"200": 1, "timeout": 1}


def _open_files(soft: int, hard: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_a_concurrency_the_open_file_limit_cannot_hold_is_refused_before_sending(
    mock, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(5))
    async with mock() as (url, server):
        proc = await start(
            url, src, tmp_path / "out", "--concurrency", "2000", preexec_fn=lambda: _open_files(256, 256)
        )
        _, stderr = await proc.communicate()
    assert proc.returncode == 2
    said = stderr.decode()
    assert "--concurrency 2,000 needs about" in said
    assert "lower --concurrency to 192" in said
    assert "Traceback" not in said
    assert server.state.received == []


async def test_the_open_file_limit_is_raised_where_the_system_allows(mock, tmp_path: Path) -> None:
    raise_open_files(700)  # this process serves the mock: room for its side of 600 connections
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    src = write_jsonl(tmp_path / "in.jsonl", bodies(600))
    async with mock(latency=1.0, record=False) as (url, server):
        # A soft limit of 256, as many systems start with.
        proc = await start(
            url, src, tmp_path / "out", "--concurrency", "600", preexec_fn=lambda: _open_files(256, hard)
        )
        _, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    assert server.state.max_in_flight > 256  # more connections at once than the soft limit held
