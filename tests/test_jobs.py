"""The jobs users bring: captioning, moderation, nightly generation; streaming; every
parameter the API takes; and what it all cost."""

from __future__ import annotations

import base64
import datetime as dt
import shutil
from pathlib import Path

import orjson
import pytest

import pipeline
from pipeline.errors import SettingsError
from tests.conftest import bodies, read_jsonl, write_jsonl

ROOT = Path(__file__).parent.parent


def usage_of(folder: Path) -> dict:
    return orjson.loads((folder / "usage.json").read_bytes())


def copy_job(tmp_path: Path, name: str) -> Path:
    """A shipped job and its samples, copied so the test writes nowhere in the repo."""
    shutil.copytree(ROOT / "samples", tmp_path / "samples")
    (tmp_path / "jobs").mkdir()
    return Path(shutil.copy(ROOT / "jobs" / f"{name}.toml", tmp_path / "jobs"))


async def test_captioning_a_catalogue(mock, make_settings, tmp_path: Path) -> None:
    job = copy_job(tmp_path, "caption")
    catalogue = tmp_path / "samples/catalogue.jsonl"
    with catalogue.open("ab") as f:  # and three records that cannot be captioned
        f.write(b'{"asset_id": "img-bad1", "title": "No picture"}\n')
        f.write(b'{"asset_id": "img-bad2", "title": "Gone", "image_path": "images/missing.png"}\n')
        (tmp_path / "samples/images/notes.txt").write_text("not an image")
        f.write(b'{"asset_id": "img-bad3", "title": "Text", "image_path": "images/notes.txt"}\n')
    async with mock() as (url, server):
        summary = await pipeline.run(make_settings(url, job=job, output=tmp_path / "out"))
    results = {r["custom_id"]: r for r in read_jsonl(tmp_path / "out/results.jsonl")}
    assert len(results) == 12
    # the record comes back whole, so the caption can be joined to the asset
    assert results["img-0003"]["metadata"]["title"] == "Snow on the old bridge"
    assert results["img-0003"]["metadata"]["collection"] == "spring-2026"
    by_title = {b["messages"][1]["content"][0]["text"].split("\n")[0]: b for b in server.state.received}
    remote = by_title["Title: Harbour at dawn"]["messages"][1]["content"]
    assert remote[1] == {
        "type": "image_url",
        "image_url": {"url": "https://media.example.com/catalogue/0001.jpg", "detail": "low"},
    }
    local = by_title["Title: Sunset from the pier"]["messages"][1]["content"][1]["image_url"]["url"]
    png = (tmp_path / "samples/images/sunset-pier.png").read_bytes()
    assert local == "data:image/png;base64," + base64.b64encode(png).decode()
    errors = {e["metadata"]["asset_id"]: e["error"] for e in read_jsonl(tmp_path / "out/errors.jsonl")}
    assert (
        errors["img-bad1"]["message"]
        == "record 'img-bad1': record has no image: set 'image_url' or 'image_path'"
    )
    assert "not found" in errors["img-bad2"]["message"]
    assert "not a PNG, JPEG, GIF or WebP image" in errors["img-bad3"]["message"]
    assert summary.exit_code == 1


async def test_moderation_verdicts_are_parsed_checked_and_counted(
    mock, make_settings, tmp_path: Path
) -> None:
    job = copy_job(tmp_path, "moderation")
    # one reply ignores the format once (then behaves), another every time
    async with mock(script=["chatty"], chatty_when="scammer") as (url, _):
        summary = await pipeline.run(make_settings(url, job=job, output=tmp_path / "out", concurrency=1))
    results = read_jsonl(tmp_path / "out/results.jsonl")
    [error] = read_jsonl(tmp_path / "out/errors.jsonl")
    assert len(results) == 7
    for r in results:
        verdict = r["parsed"]
        assert set(verdict) == {"flagged", "category", "reason"}
        assert isinstance(verdict["flagged"], bool)
        assert r["response"]["body"]["choices"][0]["message"]["content"] == orjson.dumps(verdict).decode()
    assert error["error"]["code"] == "invalid_output"
    assert "not JSON" in error["error"]["message"]
    assert error["attempts"] == 3  # [verdict] max_attempts
    assert "Here is my verdict" in error["response"]["body"]["choices"][0]["message"]["content"]
    usage = usage_of(tmp_path / "out")
    flagged = sum(r["parsed"]["flagged"] for r in results)
    assert usage["verdicts"] == {
        k: v for k, v in {"flagged: true": flagged, "flagged: false": 7 - flagged}.items() if v
    }
    assert usage["discarded"] == 4  # invalid answers were paid for: counted, not kept
    assert usage["models"]["openai/gpt-5.4-mini"]["requests"] == 11
    assert "## Verdicts" in (tmp_path / "out/report.md").read_text()
    page = (tmp_path / "out/report.html").read_text()
    assert 'alt="Verdicts"' in page
    assert "flagged: true" in page or "flagged: false" in page
    answers = [p["answers"] for s in usage["timeline"] for p in s["points"]]
    assert sum(a.get("invalid_output", 0) for a in answers) == 4  # the invalid answers, over time
    assert summary.exit_code == 1


def test_a_verdict_needs_a_schema(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('input = "a"\noutput = "b"\n[verdict]\nfield = "flagged"\n')
    with pytest.raises(SettingsError, match=r"\[verdict\] needs a JSON schema"):
        pipeline.settings_from(job)


async def test_a_nightly_run_logs_a_line_a_minute_to_a_dated_folder(
    mock, make_settings, tmp_path: Path, capsys
) -> None:
    job = copy_job(tmp_path, "nightly")
    async with mock(latency=0.1) as (url, _):
        settings = make_settings(url, job=job, output=None, progress_interval=0.15, concurrency=2)
        summary = await pipeline.run(settings)
    today = dt.date.today().isoformat()
    assert summary.output == tmp_path / f"out/nightly-{today}"
    assert len(read_jsonl(summary.output / "results.jsonl")) == 8
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines  # a log line each interval, and nothing else
    assert all(line.startswith("pipeline: ") and " of 8 done " in line and "failed" in line for line in lines)
    assert summary.exit_code == 0


async def test_streamed_replies_are_assembled_and_time_to_first_token_reported(
    mock, make_settings, tmp_path: Path
) -> None:
    rows = [
        {
            "custom_id": f"s{i}",
            "model": "m",
            "stream": True,
            "n": 2,
            "messages": [{"role": "user", "content": f"tell {i}"}],
        }
        for i in range(10)
    ]
    rows.append(
        {
            "custom_id": "tool",
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                    },
                }
            ],
        }
    )
    async with mock(script=["cut"]) as (url, server):
        summary = await pipeline.run(make_settings(url, rows))
    assert summary.exit_code == 0
    assert all(b["stream_options"] == {"include_usage": True} for b in server.state.received)
    results = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(tmp_path / "out/results.jsonl")}
    from pipeline.mock.server import completion

    for i in range(10):
        body = results[f"s{i}"]
        expected = completion({k: v for k, v in rows[i].items() if k not in ("custom_id",)})
        assert [c["message"]["content"] for c in body["choices"]] == [
            c["message"]["content"] for c in expected["choices"]
        ]
        assert body["usage"]["total_tokens"] == expected["usage"]["total_tokens"]
    call = results["tool"]["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert orjson.loads(call["function"]["arguments"]) == {
        "city": orjson.loads(call["function"]["arguments"])["city"]
    }
    usage = usage_of(tmp_path / "out")
    assert usage["ttft_seconds"]["p50"] is not None
    assert usage["answers_by_status"]["malformed_response"] == 1  # the cut stream, retried
    assert "time to first token" in (tmp_path / "out/report.md").read_text()


async def test_every_parameter_reaches_the_server_and_the_result_keeps_the_answer(
    mock, make_settings, tmp_path: Path
) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    rows = [
        {
            "custom_id": "tools",
            "model": "m",
            "messages": [{"role": "user", "content": "a"}],
            "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "lookup"}},
        },
        {
            "custom_id": "logprobs",
            "model": "m",
            "messages": [{"role": "user", "content": "b"}],
            "logprobs": True,
            "top_logprobs": 1,
        },
        {
            "custom_id": "seed-stop",
            "model": "m",
            "messages": [{"role": "user", "content": "c"}],
            "seed": 42,
            "stop": ["\n\n", "END"],
        },
        {"custom_id": "n3", "model": "m", "messages": [{"role": "user", "content": "d"}], "n": 3},
        {
            "custom_id": "routed",
            "model": "m",
            "messages": [{"role": "user", "content": "e"}],
            "provider": {
                "order": ["anthropic", "openai"],
                "allow_fallbacks": True,
                "data_collection": "deny",
            },
        },
        {
            "custom_id": "fallback",
            "messages": [{"role": "user", "content": "f"}],
            "models": ["x/unavailable", "y/backup"],
        },
    ]
    async with mock() as (url, server):
        await pipeline.run(make_settings(url, rows))
    received = {b["messages"][0]["content"]: b for b in server.state.received}
    for row in rows:
        sent = {k: v for k, v in row.items() if k != "custom_id"}
        assert received[row["messages"][0]["content"]] == sent
    results = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(tmp_path / "out/results.jsonl")}
    assert results["tools"]["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    assert results["tools"]["choices"][0]["finish_reason"] == "tool_calls"
    assert results["logprobs"]["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert results["seed-stop"]["system_fingerprint"] == "fp_mock_42"
    assert len(results["n3"]["choices"]) == 3
    assert results["fallback"]["model"] == "y/backup"
    usage = usage_of(tmp_path / "out")
    assert usage["models"]["m"]["choices"] == 1 + 1 + 1 + 3 + 1
    assert usage["models"]["y/backup"]["requests"] == 1  # the model that answered is the one billed
    assert usage["requested_models"]["x/unavailable -> y/backup"] == 1
    assert "x/unavailable -> y/backup" in (tmp_path / "out/report.md").read_text()


async def test_a_price_table_costs_what_the_server_does_not(mock, make_settings, tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[prices."priced/model"]\nprompt = 1.0\ncompletion = 2.0\n')
    rows = bodies(4, model="priced/model") + bodies(2, model="unpriced/model", start=4)
    async with mock(cost=False) as (url, _):
        summary = await pipeline.run(make_settings(url, rows, job=job))
    results = read_jsonl(tmp_path / "out/results.jsonl")
    expected = sum(
        (
            r["response"]["body"]["usage"]["prompt_tokens"] * 1.0
            + r["response"]["body"]["usage"]["completion_tokens"] * 2.0
        )
        / 1e6
        for r in results
        if r["response"]["body"]["model"] == "priced/model"
    )
    models = usage_of(tmp_path / "out")["models"]
    assert models["priced/model"]["cost"]["total"] == pytest.approx(expected)
    assert models["priced/model"]["cost"]["source"] == "price table"
    assert models["unpriced/model"]["cost"]["total"] is None
    assert models["unpriced/model"]["cost"]["source"] == "not reported"
    report = (tmp_path / "out/report.md").read_text()
    assert "price table" in report
    assert "not reported" in report
    assert summary.cost == pytest.approx(expected)


async def test_a_budget_stops_the_run_before_the_cap_and_resumes_with_a_higher_one(
    mock, make_settings, tmp_path: Path
) -> None:
    job = tmp_path / "job.toml"
    job.write_text('[prices."m"]\nprompt = 1000.0\ncompletion = 1000.0\n')  # $0.001 a token
    rows = [
        {
            "custom_id": f"b{i}",
            "model": "m",
            "max_tokens": 20,
            "messages": [{"role": "user", "content": f"q{i}"}],
        }
        for i in range(40)
    ]
    async with mock(cost=False) as (url, _):
        first = await pipeline.run(make_settings(url, rows, job=job, max_cost=0.5, concurrency=4))
        spent = usage_of(tmp_path / "out")["cost"]["total"]
        assert first.exit_code == 3
        assert "budget is reached" in first.message
        assert "higher --max-cost" in first.message
        assert spent <= 0.5
        assert 0 < first.succeeded < 40
        assert first.pending == 40 - first.succeeded
        second = await pipeline.run(make_settings(url, rows, job=job, max_cost=10.0))
    assert second.exit_code == 0
    assert second.skipped == first.succeeded
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) == 40


async def test_a_budget_with_no_way_to_price_stops_and_says_how_to_fix_it(
    mock, make_settings, tmp_path: Path
) -> None:
    async with mock(cost=False) as (url, server):
        summary = await pipeline.run(make_settings(url, bodies(20), max_cost=1.0))
    assert summary.exit_code == 3
    assert "cannot keep to --max-cost" in summary.message
    assert '[prices."test/model"]' in summary.message
    assert len(server.state.received) <= 2  # it found out on the first answer


async def test_a_budget_learns_the_cost_per_token_from_the_server(
    mock, make_settings, tmp_path: Path
) -> None:
    async with mock() as (url, _):
        rows = [{**row, "max_tokens": 30} for row in bodies(200)]
        summary = await pipeline.run(make_settings(url, rows, max_cost=0.004, concurrency=8))
    spent = usage_of(tmp_path / "out")["cost"]["total"]
    assert summary.exit_code == 3
    assert spent <= 0.004
    assert summary.succeeded > 10


def test_estimate_counts_tokens_and_cost_and_sends_nothing(tmp_path: Path, capsys) -> None:
    from pipeline.cli import main

    job = copy_job(tmp_path, "moderation")
    src = tmp_path / "samples/moderation.jsonl"
    with src.open("ab") as f:
        f.write(b"{oops\n")
    code = main(["estimate", str(job), "--base-url", "http://127.0.0.1:9/v1"])
    out, err = capsys.readouterr()
    assert code == 1  # an invalid line, listed as run would
    assert f"{src}:9: not valid JSON" in err
    assert "9 lines: 8 requests to send" in out
    assert "openai/gpt-5.4-mini" in out
    assert "$0.0002 to $0.0034" in out
    assert not (tmp_path / "out").exists()  # nothing written, nothing sent (port 9 is closed)


def test_estimate_tells_a_missing_price() -> None:
    import io

    from pipeline.estimate import estimate, print_estimate

    settings = pipeline.settings_from(ROOT / "jobs/caption.toml")
    result = estimate(settings)
    out = io.StringIO()
    print_estimate(result, out=out, err=io.StringIO())
    assert result.requests == 12
    assert (
        'no price for google/gemini-3-flash-preview: add [prices."google/gemini-3-flash-preview"]'
        in out.getvalue()
    )


def test_estimate_counts_ids_already_done_as_skipped(tmp_path: Path) -> None:
    from pipeline.estimate import estimate
    from pipeline.output.ledger import Ledger

    src = write_jsonl(tmp_path / "in.jsonl", bodies(5))
    (tmp_path / "out").mkdir()
    ledger = Ledger(tmp_path / "out/ledger.sqlite")
    ledger.add_done(["job-1", "job-3"])
    ledger.close()
    result = estimate(pipeline.settings_from(None, input=str(src), output=str(tmp_path / "out")))
    assert result.requests == 3
    assert result.counts.skipped == 2
