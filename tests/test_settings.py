"""Job files and flags: what is accepted, and what is refused with a message that helps."""

from __future__ import annotations

from pathlib import Path

import pytest

import pipeline
from pipeline.errors import SettingsError
from pipeline.estimate import estimate
from pipeline.jobfile import ModelLimit
from pipeline.settings import build


def job(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


def test_the_shipped_job_files_are_valid() -> None:
    root = Path(__file__).parent.parent
    for path in sorted((root / "jobs").glob("*.toml")):
        settings = build(path)
        assert settings.input.exists(), f"{path.name}: sample input missing"


def test_paths_are_relative_to_the_job_file_and_flags_win(tmp_path: Path) -> None:
    path = job(tmp_path, 'input = "data/in.jsonl"\noutput = "out/{date}"\nconcurrency = 4\n')
    s = build(path, concurrency=9)
    assert s.input == tmp_path / "data/in.jsonl"
    assert s.output.parent == tmp_path / "out"
    assert s.output.name[:2] == "20"  # {date} became today's date
    assert s.concurrency == 9


def test_a_typo_in_a_job_file_is_named_with_a_suggestion(tmp_path: Path) -> None:
    path = job(tmp_path, 'input = "a"\noutput = "b"\nconcurency = 4\n')
    with pytest.raises(SettingsError, match="unknown key 'concurency' \\(did you mean 'concurrency'\\?\\)"):
        build(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('input = "a"\noutput = "b"\nconcurrency = "many"\n', "'concurrency' must be int"),
        ('input = "a"\noutput = "b"\nconcurrency = 0\n', "concurrency must be a whole number above 0"),
        ('input = "a"\noutput = "b"\nrpm = -1\n', "rpm must be a number above 0"),
        (
            'input = "a"\noutput = "b"\nconcurrency = 1' + "0" * 400 + "\n",
            "concurrency must be a whole number",
        ),
        ('input = "a"\noutput = "b"\nbackoff_max = nan\n', "backoff_max must be a number of seconds"),
        ('input = "a"\noutput = "b"\nbase_url = "ftp://x"\n', "not an http\\(s\\) URL"),
        ('input = "a"\noutput = "b"\nrequest = 3\n', "'request' must be a table"),
        ('input = "a"\noutput = "b"\n[request]\nmessages = []\n', "cannot set 'messages'"),
        ('input = "a"\noutput = "b"\n[template]\nmessage = 1\n', "unknown key 'message' in \\[template\\]"),
        ('input = "a"\noutput = "b"\n[template]\nid = "{x}"\n', "needs messages"),
        ('input = "a"\noutput = "b"\n[prices."m"]\nprompt = "cheap"\n', "must be numbers"),
        (
            'input = "a"\noutput = "b"\n[limits."v/m"]\nrmp = 20\n',
            "job.toml: \\[limits.\"v/m\"\\]: unknown key 'rmp' \\(did you mean 'rpm'\\?\\)",
        ),
        ('input = "a"\noutput = "b"\n[limits."v/m"]\nrpm = 0\n', "rpm must be a number above 0, not 0"),
        ('input = "a"\noutput = "b"\n[limits."v/m"]\ntpm = "lots"\n', "tpm must be a number above 0"),
        ('input = "a"\noutput = "b"\n[limits]\n"v/m" = 20\n', "must be a table like"),
        ('input = "a"\noutput = "b"\n[limits."v/m"]\n', "gives no limit"),
        ("input = \n", "not valid TOML"),
    ],
)
def test_bad_job_files_are_refused_with_the_reason(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        build(job(tmp_path, text))


def test_a_models_own_limits_are_read_beside_the_accounts(tmp_path: Path) -> None:
    text = (
        'input = "a"\noutput = "b"\nrpm = 6000\n[limits."v/free"]\nrpm = 20\n[limits."v/big"]\ntpm = 40000\n'
    )
    s = build(job(tmp_path, text))
    assert s.rpm == 6000  # --rpm stays the account's
    assert s.limits["v/free"] == ModelLimit(rpm=20)
    assert s.limits["v/big"] == ModelLimit(tpm=40000)


def test_a_run_needs_an_output_folder_and_an_estimate_does_not(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_text('{"model": "m", "messages": [{"role": "user", "content": "hi"}]}\n')
    settings = build(input=str(src))
    with pytest.raises(SettingsError, match="no output given: pass --output"):
        pipeline.run_sync(settings)
    assert estimate(settings).requests == 1
    with pytest.raises(SettingsError, match="no input given"):
        build(output=str(tmp_path / "x"))


def test_a_missing_job_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="job file not found"):
        build(tmp_path / "missing.toml")


def test_the_key_is_not_kept_in_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MY_KEY", "sk-very-secret-value-123")
    s = build(input="a", output="b", api_key_env="MY_KEY")
    assert s.api_key() == "sk-very-secret-value-123"
    assert "sk-very-secret" not in repr(s)


@pytest.mark.parametrize(
    ("request_table", "said"),
    [
        ('stream_options = "x"', "'[request] stream_options' must be an object, not 'x'"),
        ('max_tokens = "60"', "'[request] max_tokens' must be a whole number, not '60'"),
        ("stream = 1", "'[request] stream' must be true or false, not 1"),
    ],
)
def test_request_defaults_of_a_wrong_type_are_a_settings_error(
    tmp_path: Path, request_table: str, said: str
) -> None:
    # Merged into every body after the line is checked, they crashed every line that met them
    # ("reader_error ... a bug in pipeline"): now the job file is refused, naming the key.
    src = tmp_path / "in.jsonl"
    src.write_text('{"messages": [{"role": "user", "content": "hi"}], "stream": true}\n')
    job = tmp_path / "job.toml"
    job.write_text(f'input = "in.jsonl"\n[request]\n{request_table}\n')
    with pytest.raises(SettingsError) as refused:
        build(job)
    assert said in str(refused.value)
