"""The corpus in tests/bad_inputs/: one file per kind of bad input. Each bad line gets one
clear message naming its file, line and field, lands in errors.jsonl, and the run goes on."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import pipeline
from pipeline.errors import SettingsError
from tests.conftest import read_jsonl

CORPUS = Path(__file__).parent / "bad_inputs"

# file -> [(line, error code, field, what the message says)]
CASES: dict[str, list[tuple[int, str, str | None, str]]] = {
    "not_utf8.jsonl": [(2, "not_utf8", None, "bytes at column 83 are not UTF-8; save the file as UTF-8")],
    "not_json.jsonl": [(2, "not_json", None, "not valid JSON")],
    "not_an_object.jsonl": [
        (2, "not_object", None, "line is an array, not a JSON object"),
        (3, "not_object", None, "line is a number, not a JSON object"),
    ],
    "no_messages.jsonl": [(2, "invalid_input", "messages", "no 'messages': a line must be a request body")],
    "empty_messages.jsonl": [
        (2, "invalid_input", "messages", "'messages' is empty; it must be a non-empty list")
    ],
    "wrong_types.jsonl": [
        (2, "invalid_input", "max_tokens", "'max_tokens' must be a whole number, not '100'"),
        (3, "invalid_input", "messages[0].role", "'messages[0].role' is missing or not a string"),
        (4, "invalid_input", "messages[0].content", "'messages[0].content' is a number"),
    ],
    "duplicate_custom_id.jsonl": [
        (3, "duplicate_custom_id", "custom_id", "custom_id 'ok-1' is already used on line 1")
    ],
    "empty_lines.jsonl": [],
    "batch_wrong_url.jsonl": [(2, "invalid_input", "url", "Batch line for url '/v1/embeddings'")],
    # Each of these ended the run (exit 70) on every resume: nested 1,000 deep (the standard
    # library's parser ran out of stack), NaN read by it, stream_options that are not an
    # object. Its last line, integers past 64 bits in tools and response_format (the token
    # estimate wrote them with orjson, which refuses them), is a good line.
    "deep_and_odd.jsonl": [
        (2, "too_deep", None, "the line is nested more than 200 levels deep"),
        (3, "too_deep", None, "the line is nested more than 200 levels deep"),
        (4, "not_json", None, "not valid JSON: NaN is not a number JSON allows"),
        (5, "invalid_input", "stream_options", "'stream_options' must be an object, not True"),
    ],
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_each_bad_input_is_named_listed_and_skipped(
    name: str, mock, make_settings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = CASES[name]
    src = CORPUS / name
    async with mock() as (url, _):
        summary = await pipeline.run(make_settings(url, input=src, quiet=False))
    errors = read_jsonl(tmp_path / "out/errors.jsonl")
    assert [(e["line"], e["error"]["code"], e["error"].get("field")) for e in errors] == [
        (line, code, field) for line, code, field, _ in expected
    ]
    for error, (_, _, _, message) in zip(errors, expected, strict=True):
        assert message in error["error"]["message"]
    stderr = capsys.readouterr().err
    for line, _, _, message in expected:
        assert f"{src}:{line}: " in stderr
        assert message in stderr
    # the good lines around them went through: every line accounted for
    assert len(read_jsonl(tmp_path / "out/results.jsonl")) == 2
    assert summary.exit_code == (1 if expected else 0)


async def test_a_ten_megabyte_line_goes_through_and_an_oversized_one_is_refused(
    mock, make_settings, tmp_path: Path
) -> None:
    src = CORPUS / "ten_mb_line.jsonl.gz"
    async with mock() as (url, server):
        summary = await pipeline.run(make_settings(url, input=src))
    assert summary.exit_code == 0
    assert sorted(len(b["messages"][0]["content"]) for b in server.state.received) == [6, 6, 10 * 1024 * 1024]
    async with mock() as (url, server):
        summary = await pipeline.run(
            make_settings(url, input=src, output=tmp_path / "o2", max_line_bytes=4 << 20)
        )
    [error] = read_jsonl(tmp_path / "o2/errors.jsonl")
    assert error["line"] == 2
    assert error["error"]["code"] == "line_too_long"
    assert "over the limit of 4,194,304" in error["error"]["message"]
    assert "raise max_line_bytes" in error["error"]["message"]
    assert len(read_jsonl(tmp_path / "o2/results.jsonl")) == 2


def test_a_typo_in_a_job_file_names_the_key(tmp_path: Path) -> None:
    job = shutil.copy(CORPUS / "typo.toml", tmp_path / "typo.toml")
    with pytest.raises(SettingsError, match=r"unknown key 'max_attemps' \(did you mean 'max_attempts'\?\)"):
        pipeline.settings_from(Path(job))
