"""A batch that failed validation fails only the lines its errors name, each with its own
error; its other lines go again. And a line `--then sync` sends now counts its attempts on
from the tries its batches spent: `--max-attempts` and the verdict's bound hold for both."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.batch import flawed
from pipeline.batch.flawed import named
from pipeline.mock import batchlines
from pipeline.run.runner import run
from pipeline.send.batchapi import Flaw
from pipeline.send.batchwire import info_of
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeHost, at_batch_tier
from tests.test_batch_break import JSON
from tests.test_batch_mock import MAX_LINES, MockHost
from tests.test_batch_run import VERDICT_REQUEST


def _invalid(custom_id: str) -> Callable[[str, int], str]:
    return lambda line_id, n: "invalid" if line_id == custom_id else "ok"


async def test_a_batch_failed_at_validation_fails_the_line_named_and_sends_the_others_again(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    api = FakeBatchApi(fate=_invalid("job-1"))
    settings = at_batch_tier(make_settings(server[0], bodies(4)))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 1, summary.message
    errors = read_jsonl(settings.folder / "errors.jsonl")
    assert [(e["custom_id"], e["line"]) for e in errors] == [("job-1", 2)]
    error = errors[0]["error"]
    assert (error["code"], error["param"]) == ("invalid_request", "body")
    assert error["message"].startswith("job-1 is invalid")
    results = read_jsonl(settings.folder / "results.jsonl")
    assert sorted(r["custom_id"] for r in results) == ["job-0", "job-2", "job-3"]
    assert api.made == 2  # the three others in a new batch
    assert api.ran == {"job-0": 1, "job-1": 0, "job-2": 1, "job-3": 1}


async def test_then_sync_sends_the_lines_a_batch_failed_at_validation_did_not_name_now(
    make_settings: Callable[..., Settings], server: tuple[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    api = FakeBatchApi(fate=_invalid("job-0"))
    settings = at_batch_tier(make_settings(server[0], bodies(3), max_attempts=1, quiet=False), then="sync")
    summary = await run(settings, FakeHost(api))
    assert "they fail; the other 2 are sent now (--then sync)" in capsys.readouterr().err
    assert summary.exit_code == 1, summary.message
    assert [e["custom_id"] for e in read_jsonl(settings.folder / "errors.jsonl")] == ["job-0"]
    assert len(read_jsonl(settings.folder / "results.jsonl")) == 2
    assert api.made == 1
    # (the batch ran none of them: sent now, though --max-attempts 1)
    assert sorted(body["messages"][0]["content"] for body in server[1].state.received) == [
        "question 1",
        "question 2",
    ]


@pytest.mark.parametrize("shape", ["files", "inline"])
async def test_the_mocks_validation_errors_name_lines_from_one_and_the_inline_shape_names_none(
    mock: Callable[..., Any], make_settings: Callable[..., Settings], shape: str
) -> None:
    rows = bodies(3)
    rows[1]["messages"][0]["content"] = "invalid_me please"
    async with mock(batch_api=shape, batch_max_lines=MAX_LINES) as (url, _):
        settings = at_batch_tier(make_settings(url, rows), batch_api=shape)
        summary = await run(settings, MockHost())
    assert summary.exit_code == 1, summary.message
    errors = {e["custom_id"]: e for e in read_jsonl(settings.folder / "errors.jsonl")}
    results = read_jsonl(settings.folder / "results.jsonl")
    if shape == "files":
        assert list(errors) == ["job-1"]
        assert errors["job-1"]["error"]["code"] == "invalid_request"
        assert errors["job-1"]["error"]["param"] == "body.messages"
        assert "invalid_me" in errors["job-1"]["error"]["message"]
        assert sorted(r["custom_id"] for r in results) == ["job-0", "job-2"]
    else:  # OpenRouter's one message: which line is at fault is not told, so all fail
        assert sorted(errors) == ["job-0", "job-1", "job-2"]
        assert {e["error"]["code"] for e in errors.values()} == {"batch_invalid"}
        assert results == []


def test_errors_that_do_not_all_name_a_line_of_the_file_blame_no_line_alone(tmp_path: Path) -> None:
    staged = tmp_path / "1.jsonl"
    staged.write_bytes(b'{"custom_id": "a"}\n{"custom_id": "b"}\n')
    one = Flaw("invalid_json_line", "not JSON", None, 2)
    assert named(staged, [one]) == {"b": [one]}
    assert named(staged, [one, Flaw("invalid_url", "the url", "url", 2)]) is not None
    assert named(staged, [one, Flaw("file_too_large", "too large")]) is None  # no line
    assert named(staged, [Flaw("x", "y", None, 3)]) is None  # past the file's end
    assert named(staged, [Flaw("x", "y", None, 0)]) is None  # counted from 1
    assert named(staged, []) is None
    assert named(tmp_path / "gone.jsonl", [one]) is None


ITEM = st.one_of(JSON, st.fixed_dictionaries({"code": JSON, "message": JSON, "param": JSON, "line": JSON}))


@hypothesis.settings(max_examples=200)
@given(st.one_of(JSON, st.fixed_dictionaries({"data": st.one_of(JSON, st.lists(ITEM, max_size=4))})), JSON)
def test_any_errors_a_failed_batch_comes_with_are_read_each_with_a_line_or_none(
    errors: Any, error: Any
) -> None:
    info = info_of({"id": "b", "status": "failed", "errors": errors, "error": error})
    assert len(info.errors) == len(info.flaws)
    for flaw, said in zip(info.flaws, info.errors, strict=True):
        assert flaw.line is None or (type(flaw.line) is int and f"line {flaw.line}: " in said)
        assert isinstance(flaw.message, str)
        assert flaw.message
        assert "\n" not in said
        assert flaw.code is None or isinstance(flaw.code, str)
        assert flaw.param is None or isinstance(flaw.param, str)


# -- --then sync counts the batch's tries ------------------------------------------------------


async def test_then_sync_counts_the_batch_try_against_max_attempts(
    mock: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    api = FakeBatchApi(fate=lambda custom_id, n: "500" if custom_id == "job-1" else "ok")
    async with mock(script=[500] * 5) as (url, server):
        settings = at_batch_tier(make_settings(url, bodies(2), max_attempts=3), then="sync")
        summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 1, summary.message
    errors = read_jsonl(settings.folder / "errors.jsonl")
    assert [(e["custom_id"], e["attempts"]) for e in errors] == [("job-1", 3)]
    assert len(server.state.received) == 2  # one batch, then two requests: three tries


async def test_then_sync_fails_a_line_whose_tries_the_batch_spent_and_sends_one_it_never_ran(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    fates = {"job-0": "500", "job-1": "expired"}
    api = FakeBatchApi(fate=lambda custom_id, n: fates.get(custom_id, "ok"))
    settings = at_batch_tier(make_settings(server[0], bodies(3), max_attempts=1), then="sync")
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 1, summary.message
    errors = read_jsonl(settings.folder / "errors.jsonl")
    assert [(e["custom_id"], e["attempts"]) for e in errors] == [("job-0", 1)]
    assert sorted(r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")) == ["job-1", "job-2"]
    assert [body["messages"][0]["content"] for body in server[1].state.received] == ["question 1"]


async def test_then_sync_counts_the_batch_answer_that_broke_the_verdict_against_its_bound(
    mock: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    api = FakeBatchApi(fate=lambda custom_id, n: "not json" if custom_id == "job-1" else '{"flagged": false}')
    verdict = {"field": "flagged", "max_attempts": 2}
    async with mock(chatty_when="question") as (url, server):
        settings = at_batch_tier(
            make_settings(url, bodies(2), request=VERDICT_REQUEST, verdict=verdict, max_attempts=5),
            then="sync",
        )
        summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 1, summary.message
    errors = read_jsonl(settings.folder / "errors.jsonl")
    assert [(e["custom_id"], e["attempts"]) for e in errors] == [("job-1", 2)]
    assert len(server.state.received) == 1  # the batch's answer and one more broke it: the bound
    assert summary.usage["discarded"] == 2


# -- lines held back by others' flaws spend no try -----------------------------------------------


async def test_lines_a_batch_held_back_for_another_lines_flaw_go_again_though_max_attempts_is_one(
    make_settings: Callable[..., Settings], server: tuple[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    api = FakeBatchApi(fate=_invalid("job-1"))
    settings = at_batch_tier(make_settings(server[0], bodies(4), max_attempts=1, quiet=False))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 1, summary.message
    assert [e["custom_id"] for e in read_jsonl(settings.folder / "errors.jsonl")] == ["job-1"]
    results = read_jsonl(settings.folder / "results.jsonl")
    assert sorted(r["custom_id"] for r in results) == ["job-0", "job-2", "job-3"]
    assert api.ran == {"job-0": 1, "job-1": 0, "job-2": 1, "job-3": 1}
    assert summary.usage["retries"] == 0  # each ran once: none was tried again
    said = capsys.readouterr().err
    assert "failed validation at 1 of its 4 lines" in said
    assert "they fail; the other 3 go again in a new batch" in said


async def test_a_provider_that_names_only_its_first_errors_fails_each_flawed_line_and_no_other(
    mock: Callable[..., Any],
    make_settings: Callable[..., Settings],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(batchlines, "MAX_ERRORS", 1)  # (OpenAI lists so many, and no more)
    rows = bodies(4)
    for row in rows[0], rows[2]:
        row["messages"][0]["content"] += " invalid_me"
    async with mock(batch_max_lines=MAX_LINES) as (url, _):
        # Three batches: the first names job-0; the second (its three others) job-2.
        settings = at_batch_tier(make_settings(url, rows, max_attempts=2))
        summary = await run(settings, MockHost())
    assert summary.exit_code == 1, summary.message
    errors = read_jsonl(settings.folder / "errors.jsonl")
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("job-0", "invalid_request"),
        ("job-2", "invalid_request"),
    ]
    assert sorted(r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")) == ["job-1", "job-3"]
    assert summary.usage["retries"] == 0


async def test_an_inline_batchs_error_numbers_blame_no_line_alone(
    make_settings: Callable[..., Settings], server: tuple[str, Any]
) -> None:
    # (a gateway of the inline shape may number its requests, from 0 or from 1: not told)
    api = FakeBatchApi(fate=_invalid("job-1"))
    api.shape = "inline"
    settings = at_batch_tier(make_settings(server[0], bodies(3)), batch_api="inline")
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 1, summary.message
    errors = read_jsonl(settings.folder / "errors.jsonl")
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        ("job-0", "batch_invalid"),
        ("job-1", "batch_invalid"),
        ("job-2", "batch_invalid"),
    ]
    assert "line 2: invalid_request: job-1 is invalid" in errors[0]["error"]["message"]


async def test_lines_held_back_by_a_flood_of_flaws_spend_a_try_as_an_expired_batchs_do(
    make_settings: Callable[..., Settings], server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(flawed, "MANY", 1)  # (a provider that lists a hundred errors may list no more)
    api = FakeBatchApi(fate=_invalid("job-1"))
    settings = at_batch_tier(make_settings(server[0], bodies(3), max_attempts=1))
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 1, summary.message
    errors = {e["custom_id"]: e for e in read_jsonl(settings.folder / "errors.jsonl")}
    assert {k: e["error"]["code"] for k, e in errors.items()} == {
        "job-0": "batch_invalid",
        "job-1": "invalid_request",
        "job-2": "batch_invalid",
    }
    assert errors["job-0"]["error"]["message"].endswith("(after 1 batch)")
    assert api.made == 1


async def test_then_sync_counts_the_batch_try_of_a_line_not_sent_now_for_its_models_404(
    mock: Callable[..., Any], make_settings: Callable[..., Settings]
) -> None:
    api = FakeBatchApi(fate=lambda custom_id, n: "500")
    async with mock(unknown_models=("gone/model",)) as (url, _):
        rows = bodies(3, model="gone/model")
        settings = at_batch_tier(make_settings(url, rows, concurrency=1, max_attempts=3), then="sync")
        summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 1, summary.message
    errors = read_jsonl(settings.folder / "errors.jsonl")
    # job-0: its batch's 500, then the 404 that said the model is gone; the others, their
    # batch's 500 alone (not sent now)
    assert [(e["custom_id"], e["error"]["code"], e["attempts"]) for e in errors] == [
        ("job-0", "http_error", 2),
        ("job-1", "model_not_found", 1),
        ("job-2", "model_not_found", 1),
    ]


def test_a_file_the_provider_cut_at_what_some_readers_end_a_line_at_has_its_lines_unblamed(
    tmp_path: Path,
) -> None:
    staged = tmp_path / "1.jsonl"
    for mark in ("\u2028", "\u2029", "\x85"):
        # (raw in a JSON string, as orjson writes it: Python's splitlines ends a line there,
        # and a provider reading so finds a line that is no JSON, and numbers the rest apart)
        staged.write_bytes(f'{{"custom_id": "a", "body": "one{mark}two"}}\n{{"custom_id": "b"}}\n'.encode())
        cut = Flaw("invalid_json_line", "This line is not parseable as valid JSON.", None, 2)
        assert named(staged, [cut]) is None
        flaw = Flaw("invalid_request", "bad", "body", 2)  # (no line cut: counted as ours)
        assert named(staged, [flaw]) == {"b": [flaw]}
