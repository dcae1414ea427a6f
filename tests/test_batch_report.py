"""The end of a batch run, as a person reads it and as usage.json keeps it for machines: the
batches made and their size, how long they waited, what went again or was refused, and what
the answers cost at the batch price beside the synchronous one (the saving)."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.batch import intake as intake_module
from pipeline.output.merge import merge
from pipeline.report.batches import batch_sentences
from pipeline.report.markdown import markdown
from pipeline.report.rebuild import rebuild
from pipeline.run import ending
from pipeline.run.runner import run
from pipeline.settings import Settings
from tests.conftest import bodies, write_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeHost, at_batch_tier, stopping_at_a_look
from tests.test_cli import pipeline as pipeline_cli

PRICES = '[prices]\nbatch = 0.5\n[prices."test/model"]\nprompt = 1000.0\ncompletion = 2000.0\n'


def _job(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def _fate(custom_id: str, n: int) -> str:
    if custom_id == "job-1" and n == 1:
        return "500"  # goes again in a new batch
    return "stranger" if custom_id == "job-2" else "ok"  # and a line for an id never sent


async def test_usage_json_and_the_reports_say_what_the_batches_came_to(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    api = FakeBatchApi(max_lines=3, fate=_fate, looks_to_end=2)
    settings = at_batch_tier(make_settings(server[0], bodies(5), job=_job(tmp_path, PRICES)), batch_poll=90.0)
    host = FakeHost(api)
    host.batch_clock.held = host.staging  # (both made before time moves: the waits are the same under load)
    summary = await run(settings, host)
    assert summary.exit_code == 0, summary.message
    batches = orjson.loads((settings.folder / "usage.json").read_bytes())["batches"]
    # Two batches of the 5 lines (3 and 2), then job-1 again in a third.
    assert {k: batches[k] for k in ("made", "lines", "running", "staged", "ended")} == {
        "made": 3,
        "lines": 6,
        "running": 0,
        "staged": 0,
        "ended": {"completed": 3},
    }
    assert batches["lines_per_batch"] == {"min": 1, "mean": 2.0, "max": 3}
    assert batches["lines_again"] == 1
    assert batches["result_lines_refused"] == 1
    # Each was taken in at its second look, a few seconds after it was submitted (a batch just
    # submitted is looked at as long as it has run, 2 s at least, not a poll: 90 s), its looks
    # waiting their turn (one look a second in all; the first, at 2 s, a page this API does not
    # serve): batch 1 at 3 and 6 s, batch 2 at 4 and 8, batch 3 (made at 6) at 3 and 6.
    waited = batches["waited_seconds"]
    assert waited == {"min": 6.0, "median": 6.0, "max": 8.0}
    # 5 answers of 10 prompt and 4 completion tokens at $1,000 and $2,000 a million, half that
    # at the batch tier.
    assert batches["answers"] == 5
    assert abs(batches["sync_cost"] - 5 * 0.018) < 1e-9
    assert abs(batches["cost"] - 5 * 0.009) < 1e-9
    assert abs(batches["saved"] - 5 * 0.009) < 1e-9
    said = " ".join(batch_sentences(batches))
    assert "3 batches made, 6 lines" in said
    assert "$0.0450 saved (50%)" in said
    assert "1 line(s) went again in a new batch" in said
    assert "1 result line(s) were refused" in said
    report = (settings.folder / "report.md").read_text()
    assert "## Batches" in report
    assert "$0.0450 saved (50%)" in report
    assert "$0.0450 saved (50%)" in (settings.folder / "report.html").read_text()
    # `pipeline report OUT` draws the same from the folder alone, and a run with nothing left
    # to do counts no batch twice.
    assert rebuild(settings.folder)["batches"] == batches
    assert (await run(settings, FakeHost(api))).exit_code == 0
    assert orjson.loads((settings.folder / "usage.json").read_bytes())["batches"] == batches


async def test_a_run_stopped_with_batches_running_says_they_are_still_at_the_provider(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(looks_to_end=3)
    settings = at_batch_tier(make_settings(server[0], bodies(4)))
    host = stopping_at_a_look(api)
    summary = await run(settings, host)
    assert summary.exit_code == 130
    batches = summary.usage["batches"]
    assert (batches["made"], batches["running"], batches["answers"]) == (1, 1, 0)
    assert batch_sentences(batches) == [
        "At the batch tier: 1 batch made, 4 lines; 1 batch still at the provider."
    ]
    assert summary.usage["runs"][-1]["tier"] == "batch"


def test_the_saving_is_not_told_where_a_models_synchronous_price_is_not_known() -> None:
    batches = {
        "made": 1,
        "lines": 2,
        "lines_per_batch": {"min": 2, "mean": 2.0, "max": 2},
        "running": 0,
        "staged": 0,
        "ended": {"expired": 1},
        "refused_by_provider": 0,
        "waited_seconds": {"min": 86400.0, "median": 86400.0, "max": 86400.0},
        "lines_again": 0,
        "lines_sent_now": 2,
        "result_lines_refused": 0,
        "answers": 0,
        "cost": None,
        "sync_cost": None,
        "saved": None,
    }
    assert batch_sentences(batches) == [
        "At the batch tier: 1 batch made, 2 lines; 1 expired.",
        "Each waited 24h00m from its submission to its answers.",
        "2 were sent synchronously (--then sync).",
    ]
    batches.update(answers=2, cost=0.5)
    assert batch_sentences(batches)[-1] == (
        "The 2 answers from batches cost $0.5000 at the batch price (what they would have cost "
        "synchronously is not told: [prices] lacks a model's price)."
    )


async def test_the_command_ends_saying_what_the_batches_came_to(mock, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(4))
    job = _job(tmp_path, PRICES)
    async with mock() as (url, _):
        common = ["--input", str(src), "--base-url", url, "--tier", "batch", "--batch-poll", "0.1"]
        code, out, err = await pipeline_cli("run", str(job), *common, "--output", str(tmp_path / "a"))
        assert code == 0, err
        assert "At the batch tier: 1 batch made, 4 lines; 1 completed." in out
        code, out, err = await pipeline_cli(
            "run", str(job), *common, "--output", str(tmp_path / "b"), "--quiet"
        )
        assert code == 0, err
    # (the mock states each answer's cost, at half its own price; the table's is another)
    assert "| 1 batch, $" in out
    assert " saved | " in out


async def test_a_book_that_cannot_be_read_at_the_end_leaves_the_reports_without_batches(
    make_settings: Callable[..., Settings], server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(*_: Any, **__: Any) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(ending, "figures", failing)
    settings = at_batch_tier(make_settings(server[0], bodies(2)))
    summary = await run(settings, FakeHost(FakeBatchApi()))
    assert summary.exit_code == 0, summary.message  # the run's own end, not a crash (exit 70)
    assert "batches" not in orjson.loads((settings.folder / "usage.json").read_bytes())


async def test_a_batch_whose_download_was_cut_counts_every_answer_once(
    make_settings: Callable[..., Settings], server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intake_module, "WRITE_EVERY", 2)  # the first lines written before the cut
    monkeypatch.setattr(intake_module, "READ_EVERY", 2)
    api = FakeBatchApi()
    api.cut_at = 4
    settings = at_batch_tier(make_settings(server[0], bodies(6)))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert api.cut_at is None  # the cut happened
    assert summary.usage["batches"]["answers"] == 6


async def test_a_merge_of_shards_joins_their_batches(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    api = FakeBatchApi(max_lines=2)
    out = tmp_path / "out"
    made = 0
    for k in (1, 2):
        settings = at_batch_tier(
            make_settings(server[0], bodies(8), job=_job(tmp_path, PRICES), shard=f"{k}/2")
        )
        summary = await run(settings, FakeHost(api))
        assert summary.exit_code == 0, summary.message
        made += summary.usage["batches"]["made"]
    assert made >= 4  # 8 lines, 2 a batch
    merged = merge(out)
    assert merged.results == 8
    batches = orjson.loads((out / "usage.json").read_bytes())["batches"]
    assert (batches["made"], batches["lines"], batches["answers"]) == (made, 8, 8)
    assert abs(batches["saved"] - 8 * 0.009) < 1e-9
    assert "## Batches" in (out / "report.md").read_text()
    # `pipeline report OUT` draws the same of the shards, merged or not
    assert rebuild(out)["batches"] == batches


async def test_outside_text_never_breaks_a_table_of_report_md(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    """A model's name, a provider's error code, a verdict and a run's note are outside text:
    a `|` or a line break in one gave its row more cells than the table has."""
    odd = "gw|model\\x\nnext"
    api = FakeBatchApi(fate=lambda custom_id, n: "400" if custom_id == "job-1" else "ok")
    settings = at_batch_tier(make_settings(server[0], bodies(3, model=odd), max_attempts=1))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 1, summary.message
    doc = orjson.loads((settings.folder / "usage.json").read_bytes())
    doc["errors_by_code"][odd] = 1
    doc["verdicts"][odd] = 1
    doc["runs"][-1]["note"] = odd
    text = markdown(doc)
    # models, asked -> answered (twice), codes, verdicts, the note
    assert text.count("gw\\|model\\\\x next") == 6
    rows = 0
    for table in re.findall(r"(?m)(?:^\|.*\n)+", text):
        lines = table.splitlines()
        widths = {len(re.split(r"(?<!\\)\|", line)) for line in lines}
        assert len(widths) == 1, table
        rows += len(lines)
    assert rows > 20


def test_a_cost_known_of_some_answers_only_is_not_said_to_be_the_whole() -> None:
    batches = {
        "made": 1,
        "lines": 4,
        "lines_per_batch": {"min": 4, "mean": 4.0, "max": 4},
        "running": 0,
        "staged": 0,
        "ended": {"completed": 1},
        "refused_by_provider": 0,
        "waited_seconds": {"min": 60.0, "median": 60.0, "max": 60.0},
        "lines_again": 0,
        "lines_sent_now": 0,
        "result_lines_refused": 0,
        "answers": 4,
        "answers_costed": 4,
        "cost": None,
        "sync_cost": None,
        "saved": None,
    }
    # Nothing tells a cost: it is said unknown, not "cost not reported at the batch price".
    assert batch_sentences(batches)[-1] == (
        "The 4 answers from batches: their cost at the batch price is not reported (neither the "
        "server nor [prices] tells it), not zero (what they would have cost synchronously is not "
        "told: [prices] lacks a model's price)."
    )
    # The server stated the cost of 3 answers of 4: $0.3 is not what the 4 cost.
    batches.update(answers_costed=3, cost=0.3)
    assert batch_sentences(batches)[-1] == (
        "The 4 answers from batches cost $0.3000 at the batch price and more: 1 of them came "
        "without a cost and with no price in [prices] (what they would have cost synchronously is "
        "not told: [prices] lacks a model's price)."
    )


async def test_a_batch_whose_submission_was_cut_is_not_said_unsubmitted(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    """Killed after the provider made the batch and before its id was noted: `pipeline report
    OUT` said it was staged, not submitted yet, while it ran at the provider, paid for."""
    api = FakeBatchApi()
    api.die_at = 2  # (1: the call that makes it; 2: made, its id not returned yet)
    settings = at_batch_tier(make_settings(server[0], bodies(3)))
    with pytest.raises(BaseException) as info:  # noqa: PT011 -- a kill, by any path out
        await run(settings, FakeHost(api))
    assert "submitted" in repr(info.value)  # (the step it was killed at)
    assert api.made == 1
    batches = rebuild(settings.folder)["batches"]
    assert (batches["staged"], batches["submitting"]) == (0, 1)
    said = batch_sentences(batches)[0]
    assert "not submitted" not in said
    assert "1 batch being submitted when a run stopped, perhaps made at the provider" in said


async def test_no_saving_is_told_where_prices_give_no_batch_price(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    """A `[prices]` table that says nothing of batches costs their answers at the synchronous
    price, an upper bound: the report said '$0.0000 saved (0%)', where the saving is not known."""
    job = _job(tmp_path, '[prices."test/model"]\nprompt = 1000.0\ncompletion = 2000.0\n')
    settings = at_batch_tier(make_settings(server[0], bodies(4), job=job))
    summary = await run(settings, FakeHost(FakeBatchApi()))
    assert summary.exit_code == 0, summary.message
    batches = summary.usage["batches"]
    assert (batches["answers_at_sync_price"], batches["saved"]) == (4, None)
    said = batch_sentences(batches)[-1]
    assert said.startswith("The 4 answers from batches cost at most $0.0720 at the batch price (4 of them")
    assert "saved" not in said
