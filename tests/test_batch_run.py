"""The batch tier end to end through `pipeline.run`, against a fake batch API in memory."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pipeline.batch import intake as intake_module
from pipeline.batch.cancel import cancel_batches
from pipeline.errors import SettingsError
from pipeline.run.runner import run
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeClock, FakeHost, at_batch_tier, stopping_at_a_look


async def test_every_line_lands_once_through_batches_cut_at_the_api_limit(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(max_lines=4)
    rows = bodies(10) + bodies(3, model="other/model", start=10)
    settings = at_batch_tier(make_settings(server[0], rows))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    results = read_jsonl(settings.folder / "results.jsonl")
    assert sorted(r["custom_id"] for r in results) == sorted(r["custom_id"] for r in rows)
    assert api.made == 4  # 10 lines of one model at 4 a batch, 3 of the other
    assert set(api.ran.values()) == {1}
    assert not list((settings.folder / "batches").iterdir())  # staged files gone once taken


async def test_interrupted_leaves_the_batches_running_and_the_same_command_takes_them_in(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(max_lines=2, looks_to_end=3)
    rows = bodies(4)
    settings = at_batch_tier(make_settings(server[0], rows))
    host = stopping_at_a_look(api)
    # (the first look once both are made: staged at the machine's speed while the fake
    # seconds ran on, the second was made before it one time in twenty, under load)
    host.batch_clock.held = host.staging
    summary = await run(settings, host)
    assert summary.exit_code == 130, summary.message
    assert "2 batches left running" in summary.message
    assert f"pipeline cancel {settings.folder}" in summary.message
    assert read_jsonl(settings.folder / "results.jsonl") == []
    assert api.made == 2  # both made, interrupted at the first look
    assert api.cancelled == []  # left running: they go on at the provider

    api.on_get = None
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert sorted(r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")) == [
        r["custom_id"] for r in rows
    ]
    assert api.made == 2  # both attached to, not submitted again
    assert set(api.ran.values()) == {1}


async def test_an_endpoint_without_a_batch_api_is_exit_2_before_anything_is_uploaded(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi()
    api.has_api = False
    settings = at_batch_tier(make_settings(server[0], bodies(3)))
    with pytest.raises(SettingsError, match=r"no batch API.*--tier sync"):
        await run(settings, FakeHost(api))
    assert api.made == 0
    assert api.steps == 0


async def test_a_batch_failed_at_validation_fails_its_lines_with_its_errors_and_is_not_sent_again(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(end_as="failed")
    settings = at_batch_tier(make_settings(server[0], bodies(3)))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 1, summary.message
    errors = read_jsonl(settings.folder / "errors.jsonl")
    assert [e["error"]["code"] for e in errors] == ["batch_invalid"] * 3
    assert "line 2: the body is not valid JSON" in errors[0]["error"]["message"]
    assert api.made == 1


VERDICT_REQUEST = {
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "v",
            "schema": {
                "type": "object",
                "properties": {"flagged": {"type": "boolean"}},
                "required": ["flagged"],
            },
        },
    }
}


async def test_an_answer_that_breaks_the_verdict_goes_again_in_a_new_batch(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    def fate(custom_id: str, n: int) -> str:
        return "not json" if (custom_id, n) == ("job-1", 1) else '{"flagged": false}'

    api = FakeBatchApi(fate=fate)
    settings = at_batch_tier(
        make_settings(server[0], bodies(3), request=VERDICT_REQUEST, verdict={"field": "flagged"})
    )
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    results = read_jsonl(settings.folder / "results.jsonl")
    assert sorted(r["custom_id"] for r in results) == ["job-0", "job-1", "job-2"]
    assert all(r["parsed"] == {"flagged": False} for r in results)
    assert api.ran["job-1"] == 2
    assert api.made == 2
    assert summary.usage["discarded"] == 1  # the broken answer was paid for
    assert summary.usage["verdicts"] == {"flagged: false": 3}


async def test_then_sync_pays_no_answer_more_than_the_verdict_allows(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    # [verdict] max_attempts = 1: one answer that breaks it is the last paid for, at any tier.
    api = FakeBatchApi(fate=lambda custom_id, n: "not json" if custom_id == "job-1" else '{"flagged": false}')
    verdict = {"field": "flagged", "max_attempts": 1}
    settings = at_batch_tier(
        make_settings(server[0], bodies(3), request=VERDICT_REQUEST, verdict=verdict), then="sync"
    )
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 1, summary.message
    assert [e["custom_id"] for e in read_jsonl(settings.folder / "errors.jsonl")] == ["job-1"]
    assert server[1].state.received == []  # not sent again as a request


async def test_cancel_cancels_the_running_batches_and_the_next_run_takes_in_what_they_did(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(max_lines=2, looks_to_end=3)
    settings = at_batch_tier(make_settings(server[0], bodies(2)))
    host = stopping_at_a_look(api)
    assert (await run(settings, host)).exit_code == 130
    said: list[str] = []
    status = await cancel_batches(settings.folder, api, clock=FakeClock(), say=said.append)
    assert status == 0, said
    assert api.cancelled == ["batch_1"]
    assert "1 of 1 batch(es) ended" in said[-1]

    api.on_get = None
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert len(read_jsonl(settings.folder / "results.jsonl")) == 2
    assert api.made == 2  # what the cancelled batch did not run went again


async def test_max_cost_is_held_per_batch_before_it_is_submitted(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(max_lines=2)
    rows = [{**row, "max_tokens": 5} for row in bodies(4)]
    prices = {"test/model": {"prompt": 1000.0, "completion": 1000.0}}
    settings = at_batch_tier(make_settings(server[0], rows, prices=prices, max_cost=0.01))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 3, summary.message
    assert "the budget is reached" in summary.message
    assert "2 staged and not submitted yet" in summary.message
    assert api.made == 0  # nothing sent that the cap could not cover

    roomy = at_batch_tier(settings, max_cost=10.0)
    summary = await run(roomy, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert api.made == 2
    assert summary.cost is not None
    assert 0 < summary.cost < 10.0


async def test_then_sync_sends_what_the_batches_left_undone_now(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(fate=lambda custom_id, n: "500" if custom_id == "job-1" else "ok")
    settings = at_batch_tier(make_settings(server[0], bodies(3), max_attempts=3), then="sync")
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    results = {r["custom_id"]: r for r in read_jsonl(settings.folder / "results.jsonl")}
    assert sorted(results) == ["job-0", "job-1", "job-2"]
    # Its one batch, then at once the synchronous request: not a second batch, whose day a
    # nightly run would wait for, though --max-attempts allowed more.
    assert api.ran["job-1"] == 1
    assert results["job-1"]["response"]["body"]["choices"][0]["message"]["content"] != "answer to job-1"
    assert [body["messages"][0]["content"] for body in server[1].state.received] == ["question 1"]


async def test_a_synchronous_run_into_a_folder_with_batches_running_says_they_are_paid_twice(
    make_settings: Callable[..., Settings], server: tuple[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    api = FakeBatchApi(looks_to_end=3)
    sync = make_settings(server[0], bodies(2))
    host = stopping_at_a_look(api)
    assert (await run(at_batch_tier(sync), host)).exit_code == 130
    capsys.readouterr()
    summary = await run(sync)
    assert summary.exit_code == 0, summary.message
    assert "1 batch(es) of this folder are still at the provider" in capsys.readouterr().err


async def test_a_download_cut_short_is_taken_again_and_nothing_is_written_twice(
    make_settings: Callable[..., Settings], server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(intake_module, "WRITE_EVERY", 2)  # the first lines written before the cut
    monkeypatch.setattr(intake_module, "READ_EVERY", 2)
    api = FakeBatchApi()
    api.cut_at = 4
    rows = bodies(6)
    settings = at_batch_tier(make_settings(server[0], rows))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    results = [r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")]
    assert sorted(results) == sorted(r["custom_id"] for r in rows)  # each once
    assert api.cut_at is None  # the cut happened
    assert api.made == 1


async def test_a_batch_refused_for_want_of_room_goes_again_once_a_batch_running_has_ended(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(max_lines=2, looks_to_end=2)
    api.fail_made = {1: ("token_limit_exceeded: Enqueued token limit reached for m",)}
    settings = at_batch_tier(make_settings(server[0], bodies(4)))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert len(read_jsonl(settings.folder / "results.jsonl")) == 4
    assert api.made == 3  # the refused one made again, its lines not failed
    assert api.ran["job-0"] == 1  # (a batch that failed ran nothing, and is not counted)


async def test_then_sync_answers_are_costed_at_the_synchronous_price_the_batches_at_theirs(
    mock: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    # Neither the batches nor the requests state a cost: the price table tells, at the tier
    # each answer was bought at.
    api = FakeBatchApi(fate=lambda custom_id, n: "500" if custom_id == "job-1" else "ok")
    prices = {"test/model": {"prompt": 1000.0, "completion": 2000.0}, "batch": 0.5}
    async with mock(cost=False) as (url, _):
        settings = at_batch_tier(make_settings(url, bodies(3), prices=prices), then="sync")
        summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    expected = 0.0
    for result in read_jsonl(settings.folder / "results.jsonl"):
        used = result["response"]["body"]["usage"]
        full = (used["prompt_tokens"] * 1000.0 + used["completion_tokens"] * 2000.0) / 1e6
        expected += full if result["custom_id"] == "job-1" else full / 2  # job-1: sent now
    assert summary.cost is not None
    assert abs(summary.cost - expected) < 1e-9, (summary.cost, expected)
