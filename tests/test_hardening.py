"""What a careful reading found: each a way a run could have gone wrong, now shown not to."""

from __future__ import annotations

import asyncio
import errno
import gzip
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import orjson
import pytest

import pipeline
from pipeline.account.cost import Budget, answer_cost
from pipeline.account.usage import Usage
from pipeline.errors import MalformedResponse, SettingsError
from pipeline.job import Request
from pipeline.output import appendfile
from pipeline.prices import Price
from pipeline.send.sse import StreamAssembler
from tests.conftest import FAKE_KEY, bodies, read_jsonl, until, write_jsonl
from tests.test_crash import start


def request(model: str, *, prompt: int = 100, completion: int = 100, bounded: bool = True) -> Request:
    return Request(
        custom_id="r",
        line=1,
        payload=b"{}",
        model=model,
        prompt_tokens=prompt,
        max_completion_tokens=completion,
        bounded=bounded,
    )


def answer(model: str, prompt: int, completion: int, cost: float | None = None) -> dict:
    usage: dict = {"prompt_tokens": prompt, "completion_tokens": completion}
    if cost is not None:
        usage["cost"] = cost
    return {"model": model, "usage": usage}


# -- cost and budget ---------------------------------------------------------------------------


def test_a_dated_answering_model_is_priced_as_the_model_asked_for() -> None:
    prices = {"gpt-4o-mini": Price(1.0, 2.0)}
    body = answer("gpt-4o-mini-2024-07-18", 1000, 500)
    assert answer_cost(body, prices, "gpt-4o-mini") == (pytest.approx(0.002), "price table")
    assert answer_cost(answer("m", 10, 10, cost=0.5), prices, "m") == (0.5, "server")
    assert answer_cost(answer("other", 10, 10), prices, "other") == (None, None)


async def test_a_budget_learns_each_models_cost_apart() -> None:
    budget = Budget(10.0, Usage(), {})
    first = await budget.reserve(request("cheap"))
    assert first is not None
    assert first.model == "cheap"
    budget.charge(answer("cheap", 100, 100, cost=0.0002), "cheap")
    budget.release(first)
    assert budget.worst_case(request("cheap")) == pytest.approx(0.0002)
    # what one model costs says nothing of another: its first request goes alone too
    assert budget.worst_case(request("dear")) is None
    dear = await budget.reserve(request("dear"))
    assert dear is not None
    assert dear.model == "dear"
    waiting = asyncio.ensure_future(budget.reserve(request("dear")))
    await asyncio.sleep(0)
    assert not waiting.done()  # a second one waits for the first to tell the price
    budget.charge(answer("dear", 100, 100, cost=0.2), "dear")
    budget.release(dear)
    second = await waiting
    assert second is not None
    assert second.amount == pytest.approx(0.2)


async def test_a_request_without_max_tokens_reserves_twice_the_longest_answer_seen() -> None:
    budget = Budget(10.0, Usage(), {"m": Price(1_000_000.0, 1_000_000.0)})  # $1 a token
    budget.charge(answer("m", 10, 6000), "m")
    assert budget.worst_case(request("m", prompt=10, completion=4096, bounded=False)) == pytest.approx(12_010)
    assert budget.worst_case(request("m", prompt=10, completion=50)) == pytest.approx(60)


async def test_a_retried_answer_that_was_paid_for_must_fit_the_cap() -> None:
    budget = Budget(1.0, Usage(), {"m": Price(1000.0, 1000.0)})  # $0.001 a token
    held = await budget.reserve(request("m", prompt=300, completion=300))  # $0.60
    assert held is not None
    assert budget.covers_another_answer()
    budget.charge(answer("m", 300, 300), "m")  # billed, then thrown away (invalid verdict)
    assert not budget.covers_another_answer()  # another $0.60 would pass the $1 cap


async def test_requests_the_server_calls_bad_are_not_an_outage(mock, make_settings, tmp_path: Path) -> None:
    rows = bodies(60)
    async with mock(script=[400] * 60) as (url, _):
        started = time.monotonic()
        summary = await pipeline.run(make_settings(url, rows, concurrency=8))
        elapsed = time.monotonic() - started
    assert summary.exit_code == 1
    assert len(read_jsonl(tmp_path / "out/errors.jsonl")) == 60
    assert elapsed < 3  # no pool-wide pause for the requests' own faults


async def test_moderation_refusals_do_not_stop_the_run(mock, make_settings, tmp_path: Path) -> None:
    async with mock(script=["moderated"] * 8) as (url, _):
        summary = await pipeline.run(make_settings(url, bodies(12), concurrency=1))
    assert summary.exit_code == 1  # eight refused, four answered: not "the key is refused"
    errors = read_jsonl(tmp_path / "out/errors.jsonl")
    assert len(errors) == 8
    assert all(e["response"]["status_code"] == 403 for e in errors)
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) == 4


# -- the output folder -----------------------------------------------------------------------------


async def test_a_full_disk_stops_the_run_cleanly_and_it_resumes_exactly_once(
    mock, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = appendfile.append_whole
    calls = [0]

    def flaky(fd: int, data: bytes, size: int) -> int:
        calls[0] += 1
        if calls[0] == 3:
            os.write(fd, data[: len(data) // 2])  # half a batch reaches the disk...
            os.ftruncate(fd, size)  # ...which _append would cut back; do as it does
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, size)

    monkeypatch.setattr(appendfile, "append_whole", flaky)
    rows = bodies(300)
    async with mock(latency=0.005) as (url, _):
        summary = await pipeline.run(make_settings(url, rows, concurrency=4))
        assert summary.exit_code == 3
        assert "cannot write to" in summary.message
        assert "No space left on device" in summary.message
        monkeypatch.setattr(appendfile, "append_whole", real)
        summary = await pipeline.run(make_settings(url, rows))
    assert summary.exit_code == 0
    data = (tmp_path / "out/results.jsonl").read_bytes()
    assert data.endswith(b"\n")
    ids = Counter(r["custom_id"] for r in read_jsonl(tmp_path / "out/results.jsonl"))
    assert len(ids) == 300
    assert max(ids.values()) == 1


def test_a_failed_append_leaves_no_torn_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"whole line\n")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    real_write = os.write

    def short_then_full(fd_: int, data: memoryview) -> int:
        if len(data) > 5:
            return real_write(fd_, data[:5])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(OSError, match="No space left"):
        appendfile.append_whole(fd, b"a new line that will not fit\n", 11)
    os.close(fd)
    assert path.read_bytes() == b"whole line\n"


async def test_a_resumed_catalogue_does_not_read_images_again(
    mock, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.input import template

    root = Path(__file__).parent.parent
    job = root / "jobs/caption.toml"
    async with mock() as (url, _):
        await pipeline.run(make_settings(url, job=job, output=tmp_path / "out"))
        reads: list[Path] = []
        real = template.look
        monkeypatch.setattr(
            template, "look", lambda path, *a, **kw: reads.append(path) or real(path, *a, **kw)
        )
        summary = await pipeline.run(make_settings(url, job=job, output=tmp_path / "out"))
    assert summary.skipped == 12
    assert reads == []  # a record already done is skipped before its messages are built


# -- the input -----------------------------------------------------------------------------------


async def test_a_gzip_file_cut_short_stops_with_a_message_and_keeps_what_came_before(
    mock, make_settings, tmp_path: Path
) -> None:
    data = b"".join(orjson.dumps(b) + b"\n" for b in bodies(2000))
    zipped = gzip.compress(data)
    src = tmp_path / "in.jsonl.gz"
    src.write_bytes(zipped[: len(zipped) * 2 // 3])
    async with mock() as (url, _):
        summary = await pipeline.run(make_settings(url, input=src))
    assert summary.exit_code == 3
    assert "cannot read" in summary.message
    assert "cut short" in summary.message
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) > 0


async def test_input_from_a_pipe(mock, make_settings, tmp_path: Path) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    data = b"".join(orjson.dumps(b) + b"\n" for b in bodies(50))
    feeder = threading.Thread(target=lambda: fifo.write_bytes(data), daemon=True)
    feeder.start()
    async with mock() as (url, _):
        summary = await pipeline.run(make_settings(url, input=fifo))
    feeder.join(timeout=5)
    assert summary.exit_code == 0
    assert summary.succeeded == 50


async def test_a_lone_surrogate_is_an_input_error_not_a_crash(mock, make_settings, tmp_path: Path) -> None:
    bad = (
        b'{"model": "m", "seed": 123456789012345678901, "messages": [{"role": "user", "content": "\\ud800"}]}'
    )
    async with mock() as (url, _):
        summary = await pipeline.run(make_settings(url, [bodies(1)[0], bad]))
    [error] = read_jsonl(tmp_path / "out/errors.jsonl")
    assert error["line"] == 2
    assert "lone surrogate" in error["error"]["message"]
    assert summary.succeeded == 1


def test_a_bad_port_or_a_key_in_place_of_its_name_is_refused_without_echo(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="port that is not a number"):
        pipeline.settings_from(None, input="a", output="b", base_url="http://localhost:99999/v1")
    with pytest.raises(SettingsError) as e:
        pipeline.settings_from(None, input="a", output="b", api_key_env=FAKE_KEY)
    assert FAKE_KEY not in str(e.value)
    assert "name of an environment variable" in str(e.value)


# -- streams ---------------------------------------------------------------------------------------


def test_stream_chunks_of_impossible_shapes_are_malformed_not_a_crash() -> None:
    for chunk in (
        {"choices": [{"index": "0", "delta": {"content": "x"}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": -1}]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 10**9}]}}]},
    ):
        with pytest.raises(MalformedResponse):
            StreamAssembler().feed(chunk)
    a = StreamAssembler()
    a.feed({"choices": [{"index": 0, "delta": {"content": "a"}, "logprobs": {"content": None}}]})
    a.feed({"choices": [{"index": 0, "delta": {"content": "b"}, "logprobs": {"content": [{"t": 1}]}}]})
    a.feed({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    a.done = True
    assert a.completion()["choices"][0]["logprobs"]["content"] == [{"t": 1}]


async def test_a_server_that_ignores_stream_true_still_gives_a_result(
    mock, make_settings, tmp_path: Path
) -> None:
    rows = [{**b, "stream": True} for b in bodies(3)]
    async with mock(ignore_stream=True) as (url, server):
        summary = await pipeline.run(make_settings(url, rows))
    assert summary.exit_code == 0
    assert len(server.state.received) == 3  # read as one JSON body, not retried as a cut stream


# -- shutdown ------------------------------------------------------------------------------------


async def test_an_interrupt_does_not_wait_for_retries_to_wake(mock, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(40))
    async with mock(rate_429=1.0, retry_after=30.0, record=False) as (url, server):
        proc = await start(url, src, tmp_path / "out", "--concurrency", "4")
        await until(lambda: server.state.statuses["429"] >= 1)  # a retry waits 30 s
        began = time.monotonic()
        proc.send_signal(signal.SIGINT)
        await proc.communicate()
    assert proc.returncode == 130
    assert time.monotonic() - began < 5  # not the 30 s of Retry-After, nor the grace period


async def test_reports_that_cannot_be_written_end_the_run_with_exit_3_on_record(
    mock, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.output.ledger import Ledger
    from pipeline.run import ending

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ending, "write_reports", full_disk)
    async with mock() as (url, _):
        summary = await pipeline.run(make_settings(url, bodies(20)))
    assert summary.exit_code == 3
    assert (
        "usage.json, report.md and report.html could not be written (No space left on device)"
        in summary.message
    )
    # The ledger's record of the run says the same, so a later report does too.
    ledger = Ledger(tmp_path / "out" / "ledger.sqlite")
    try:
        last = ledger.get("usage")["runs"][-1]
    finally:
        ledger.close()
    assert last["exit"] == 3
    assert "could not be written" in last["note"]
    assert last["succeeded"] == 20
