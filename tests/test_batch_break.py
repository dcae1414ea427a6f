"""What a second reader found by trying to break the batch run, each pinned by a test that
fails without its fix (the real SIGKILLs are in test_batch_sigkill)."""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.account.books import Books
from pipeline.account.cost import Price
from pipeline.account.usage import Usage
from pipeline.batch.again import TAKING
from pipeline.batch.book import Book
from pipeline.batch.follow import Follower
from pipeline.batch.judge import LineJudge
from pipeline.errors import MalformedResponse
from pipeline.job import Failure
from pipeline.output.ledger import Ledger
from pipeline.run.runner import run
from pipeline.send.batchapi import BatchInfo
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl, write_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeHost, at_batch_tier, stopping_at_a_look


async def test_a_line_of_a_batch_taken_in_while_the_input_is_still_read_is_not_staged_again(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    # A batch left running holds the input's last line; the next run takes it in at its first
    # look, long before the reader comes to that line (the many lines before it are staged
    # first, a few to a batch). The book has let go of the batch's lines by then: the line
    # was staged again and paid twice (seen at a real SIGKILL, test_batch_sigkill: 65 lines).
    last = bodies(1, start=599)
    settings = at_batch_tier(make_settings(server[0], last))
    api = FakeBatchApi(max_lines=5, looks_to_end=2)
    host = stopping_at_a_look(api)
    summary = await run(settings, host)
    assert summary.exit_code == 130, summary.message
    api.on_get = None
    write_jsonl(settings.input, bodies(600))  # (the same input file: the same job)
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    ids = [r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")]
    assert sorted(ids) == sorted(f"job-{i}" for i in range(600))
    assert api.ran["job-599"] == 1
    assert set(api.ran.values()) == {1}


async def test_fresh_says_the_batches_it_moves_aside_are_still_paid_for_and_cancel_reaches_them(
    make_settings: Callable[..., Settings], server: tuple[str, Any], capsys: Any
) -> None:
    from pipeline.batch.cancel import cancel_batches

    settings = at_batch_tier(make_settings(server[0], bodies(4)))
    api = FakeBatchApi(max_lines=4, looks_to_end=3)
    host = stopping_at_a_look(api)
    assert (await run(settings, host)).exit_code == 130
    api.on_get = None
    capsys.readouterr()
    summary = await run(dataclasses.replace(settings, fresh=True), FakeHost(api))
    assert summary.exit_code == 0, summary.message
    (previous,) = settings.folder.glob("previous-*")
    said = capsys.readouterr().err
    assert "1 batch(es) of the earlier run are still at the provider" in said
    assert f"pipeline cancel {previous}" in said
    assert not list((settings.folder / "batches").iterdir())  # this run's, taken in
    assert list((previous / "batches").iterdir())  # the earlier run's staged file went aside too
    assert await cancel_batches(previous, api, say=lambda text: None) == 0
    assert api.cancelled == ["batch_1"]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# Mostly a result line for the batch's id, of any shape inside; now and then any bytes.
RESULT_LINE = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda response, error, extra: json.dumps(
            {"custom_id": "job-0", "response": response, "error": error, **extra}
        ).encode(),
        st.one_of(JSON, st.fixed_dictionaries({"status_code": JSON, "body": JSON, "request_id": JSON})),
        st.one_of(JSON, st.fixed_dictionaries({"code": JSON, "message": JSON})),
        st.dictionaries(st.sampled_from(["id", "custom_id"]), JSON, max_size=1),
    ),
)


@functools.cache
def _one_line_batch() -> tuple[Ledger, Book, int]:
    """A book whose batch holds one line, job-0 (one for all examples: a fresh one each costs
    more than the example)."""
    ledger = Ledger(Path(tempfile.mkdtemp(prefix="pipeline-judge-")) / "ledger.sqlite")
    book = Book(ledger, ledger.path.parent)
    n = book.open("m")
    book.list_lines(n, [("job-0", 1, 1, None)])
    book.staged(n, lines=1, size=10)
    ledger.writing().execute(TAKING)
    ledger.commit()
    return ledger, book, n


@hypothesis.settings(max_examples=200)
@given(RESULT_LINE)
def test_any_result_line_is_refused_written_or_sent_again_and_never_ends_the_run(raw: bytes) -> None:
    ledger, book, n = _one_line_batch()
    ledger.writing().execute("DELETE FROM taking")
    books = Books(Usage(), {"m": Price(prompt=1.0, completion=2.0)})
    judge = LineJudge(book=book, ledger=ledger, books=books, verdict=None, max_attempts=2, now=False)
    judge.lines(book.batch(n), [raw], 0.0)
    again = ledger.reading().execute("SELECT again FROM taking WHERE id = 'job-0'").fetchone()
    fates = [judge.refused == 1, len(judge.outcomes) == 1, again is not None and again[0] is not None]
    assert fates.count(True) == 1, (raw, fates)
    if judge.outcomes:
        outcome = judge.outcomes[0]
        assert outcome.custom_id == "job-0"
        if isinstance(outcome, Failure):
            assert isinstance(outcome.code, str)


async def test_results_that_cannot_be_read_stop_the_run_after_a_while_rather_than_never(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    # A gateway whose batch ended failed counting lines answered, and names no output file (the
    # client refuses to read that as no answers): read again at every look, for ever.
    class Unreadable(FakeBatchApi):
        async def results(self, info: BatchInfo) -> AsyncIterator[bytes]:
            raise MalformedResponse(
                f"batch {info.id} ended failed with 2 lines answered but names no output file"
            )
            yield b""  # (a generator)

    settings = at_batch_tier(make_settings(server[0], bodies(2), give_up_after=60.0))
    api = Unreadable()
    with anyio.fail_after(20):  # (without the bound, the fake clock spins for ever)
        summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 3, summary.message
    assert "the results of batch 1 could not be read" in summary.message
    assert "run the same command again" in summary.message
    assert api.made == 1
    assert read_jsonl(settings.folder / "results.jsonl") == []


async def test_lines_with_local_images_fail_alone_where_the_batches_take_none(
    mock: Callable[..., Any], make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # OpenRouter's inline batches are text only: a batch holding one image failed validation,
    # and every line of it with it, each under every other line's error.
    from PIL import Image

    from tests.test_batch_mock import MockHost

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "img" / "a.png")
    job = tmp_path / "job.toml"
    job.write_text(
        '[request]\nmodel = "vision/model"\nmax_tokens = 50\n'
        '[template]\nid = "{asset_id}"\n[[template.messages]]\nrole = "user"\n'
        'content = [{ type = "text", text = "Alt text for {asset_id}" }, '
        '{ type = "image", path = "image_path" }]\n'
    )
    rows = [{"asset_id": f"a{i}", "image_path": "img/a.png"} for i in range(3)]
    async with mock(batch_api="inline") as (url, server):
        settings = at_batch_tier(make_settings(url, rows, job=job), batch_api="inline")
        summary = await run(settings, MockHost())
        assert summary.exit_code == 1, summary.message
        errors = read_jsonl(settings.folder / "errors.jsonl")
        assert sorted(e["custom_id"] for e in errors) == ["a0", "a1", "a2"]
        assert {e["error"]["code"] for e in errors} == {"images_not_batched"}
        assert "--tier sync" in errors[0]["error"]["message"]
        assert server.state.stats()["batch"]["batches_created"] == 0


async def test_a_batch_cancelled_while_the_run_follows_it_is_not_submitted_again_by_that_run(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    # `pipeline cancel OUT` while a run follows: the run took the cancelled batch in and sent
    # its undone half again at once, in a new batch, undoing the cancel.
    settings = at_batch_tier(make_settings(server[0], bodies(4), max_attempts=3))
    api = FakeBatchApi(looks_to_end=100)
    looks = 0

    def cancel_at_the_second_look() -> None:
        nonlocal looks
        looks += 1
        if looks == 2:  # (as pipeline cancel does, from another process)
            batch = api.batches["batch_1"]
            batch.info = batch.info._replace(status="cancelled")

    api.on_get = cancel_at_the_second_look
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 3, summary.message
    assert "batch 1 was cancelled while this run followed it" in summary.message
    assert api.made == 1
    assert [r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")] == ["job-0", "job-1"]
    errors = read_jsonl(settings.folder / "errors.jsonl")
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("job-2", "batch_cancelled"),
        ("job-3", "batch_cancelled"),
    ]
    api.on_get, api.looks_to_end = None, 1
    summary = await run(settings, FakeHost(api))  # the same command: what the cancel stopped
    assert summary.exit_code == 0, summary.message
    assert sorted(r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")) == [
        f"job-{i}" for i in range(4)
    ]
    assert api.made == 2


async def test_a_run_cancelled_while_a_batch_is_being_made_says_it_may_be_at_the_provider(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    # Ctrl-C twice while the call that makes a batch is under way (the batch made, the answer
    # not back): the run said only "interrupted", nothing of a batch paid for or of cancel.
    class SlowToAnswer(FakeBatchApi):
        host: FakeHost

        async def submit(self, staged: Path, *, tag: str, model: str, lines: int) -> BatchInfo:
            await super().submit(staged, tag=tag, model=model, lines=lines)
            assert self.host.control is not None
            self.host.control.interrupt()
            self.host.control.cancel()
            await anyio.sleep_forever()
            raise AssertionError  # (never)

    settings = at_batch_tier(make_settings(server[0], bodies(2)))
    api = SlowToAnswer()
    api.host = FakeHost(api)
    summary = await run(settings, api.host)
    assert summary.exit_code == 130, summary.message
    assert api.made == 1
    assert "1 batch left running at the provider" in summary.message
    assert f"pipeline cancel {settings.folder}" in summary.message


async def test_a_sync_run_between_two_batch_runs_leaves_no_staged_batch_to_pay_its_lines_again(
    make_settings: Callable[..., Settings],
    server: tuple[str, Any],
    capsys: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A batch run stopped with one batch running and one staged (never submitted); a sync run
    # then did every line; the next batch run submitted the staged batch all the same: its
    # lines paid twice. And the sync run counted the staged batch as one at the provider.
    sync = make_settings(server[0], bodies(4))
    settings = at_batch_tier(sync)
    staged = anyio.Event()
    staging_done = Follower.staging_done
    monkeypatch.setattr(Follower, "staging_done", lambda self: (staging_done(self), staged.set()))

    class Stopped(FakeBatchApi):
        """Interrupted (Ctrl-C) as its first batch is made, once the second is staged: an
        interrupt at the first look found the second made too, under load (the stager's
        speed against the follower's)."""

        async def submit(self, staged_file: Path, *, tag: str, model: str, lines: int) -> BatchInfo:
            await staged.wait()
            info = await super().submit(staged_file, tag=tag, model=model, lines=lines)
            assert host.control is not None
            host.control.interrupt()
            return info

    api = Stopped(max_lines=2, looks_to_end=3)
    host = FakeHost(api)
    assert (await run(settings, host)).exit_code == 130
    assert api.made == 1
    capsys.readouterr()
    assert (await run(sync)).exit_code == 0
    assert "1 batch(es) of this folder are still at the provider" in capsys.readouterr().err
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert api.made == 1  # the staged one was not submitted: its lines were done
    assert sorted(r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")) == [
        f"job-{i}" for i in range(4)
    ]


async def test_a_batch_found_cancelling_at_the_first_look_was_cancelled_before_and_goes_again(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    # pipeline cancel OUT, which stopped waiting while the batch was still cancelling; then the
    # same run command, which is to send what the cancel stopped, not stop at it.
    class Cancelling(FakeBatchApi):
        said: list[str]  # what batch 1 says at this run's looks

        async def get(self, batch_id: str) -> BatchInfo:
            info = await super().get(batch_id)
            if batch_id == "batch_1" and self.said:
                info = info._replace(status=self.said.pop(0))
                self.batches[batch_id].info = info
            return info

    settings = at_batch_tier(make_settings(server[0], bodies(4), max_attempts=3))
    api = Cancelling(looks_to_end=100)
    host = FakeHost(api)

    def interrupt() -> None:
        assert host.control is not None
        host.control.interrupt()

    api.said, api.on_get = [], interrupt
    assert (await run(settings, host)).exit_code == 130
    api.said, api.on_get, api.looks_to_end = ["cancelling", "cancelled"], None, 1
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert len(read_jsonl(settings.folder / "results.jsonl")) == 4
    assert api.made == 2  # the half the cancel stopped, sent again


async def test_lines_with_image_urls_go_in_batches_apart_where_the_batches_are_text_only(
    mock: Callable[..., Any], make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    # An image given as a URL goes in an inline batch as written; the mock (as OpenRouter's
    # docs have said) takes none, and failed the whole batch: the text lines with it.
    from tests.test_batch_mock import MockHost

    pictured = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    rows = bodies(4)
    for row in rows[1::2]:  # job-1, job-3
        row["messages"][0]["content"] = [{"type": "text", "text": "what is it?"}, pictured]
    rows[0]["messages"][0]["content"] = 'a text that quotes "image_url" and "file"'
    async with mock(batch_api="inline") as (url, server):
        settings = at_batch_tier(make_settings(url, rows, max_attempts=1), batch_api="inline")
        summary = await run(settings, MockHost())
        assert summary.exit_code == 1, summary.message
        assert sorted(r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")) == [
            "job-0",
            "job-2",
        ]
        errors = read_jsonl(settings.folder / "errors.jsonl")
        assert sorted(e["custom_id"] for e in errors) == ["job-1", "job-3"]
        assert server.state.stats()["batch"]["batches_created"] == 2
