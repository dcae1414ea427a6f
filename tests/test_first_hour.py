"""A new user's first hour: flags, slips and the messages that follow them."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path
from typing import Any

import pytest

import pipeline
from pipeline.account.usage import Usage
from pipeline.cli import main
from pipeline.input.reader import ReadCounts
from pipeline.parser import parser
from pipeline.run.progress import Progress
from pipeline.settings import build
from tests.conftest import bodies, read_jsonl, write_jsonl
from tests.test_cli import pipeline as pipeline_cli

ROOT = Path(__file__).resolve().parent.parent


async def run_into(
    url: str, src: Path, out: Path, *extra: str, job: Path | None = None
) -> tuple[int, str, str]:
    """`pipeline run [JOB] --input SRC --output OUT --base-url URL EXTRA...`, as a user types it."""
    return await pipeline_cli(
        "run",
        *([str(job)] if job else []),
        "--input",
        str(src),
        "--output",
        str(out),
        "--base-url",
        url,
        *extra,
    )


def job_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.toml"
    path.write_text(text)
    return path


async def test_a_model_flag_beats_the_job_file_and_a_line_keeps_its_own(mock, tmp_path: Path) -> None:
    job = job_file(tmp_path, '[request]\nmodel = "job/model"\nmax_tokens = 20\n')
    rows: list[dict[str, Any]] = [
        {"custom_id": f"q{i}", "messages": [{"role": "user", "content": f"q {i}"}]} for i in range(3)
    ]
    rows.append({"custom_id": "own", "model": "line/model", "messages": [{"role": "user", "content": "x"}]})
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out"
    async with mock() as (url, server):
        code, stdout, err = await run_into(url, src, out, "--model", "flag/model", job=job)
        assert code == 0, err
        sent = {body["model"] for body in server.state.received}
        assert sent == {"flag/model", "line/model"}
        assert all(body["max_tokens"] == 20 for body in server.state.received)  # the rest of [request] holds
        assert "1 line(s) named a model of their own and kept it" in stdout

        # Another model into the same folder is another job: refused, naming the change.
        code, _, err = await run_into(url, src, out, "--model", "other/model", job=job)
    assert code == 2
    assert "model was 'flag/model', now 'other/model'" in err
    assert len(err) < 400


async def test_a_different_job_names_what_differs_and_nothing_else(mock, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(2))
    out = tmp_path / "out"
    long_prompt = "a system prompt " * 60
    async with mock() as (url, _):
        for temperature in (0.2, 0.7):
            job = job_file(
                tmp_path, f'[request]\ntemperature = {temperature}\nsystem_note = "{long_prompt}"\n'
            )
            code, _, err = await run_into(url, src, out, job=job)
    assert code == 2
    assert "request.temperature was 0.2, now 0.7" in err
    assert long_prompt not in err  # what did not change is not printed


def test_estimate_needs_no_output_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(3))
    assert main(["estimate", "--input", str(src)]) == 0
    out, err = capsys.readouterr()
    assert "3 requests to send" in out
    assert err == ""


async def test_an_empty_input_says_there_was_nothing_to_do(mock, tmp_path: Path) -> None:
    src = tmp_path / "empty.jsonl"
    src.write_bytes(b"")
    async with mock() as (url, _):
        code, out, _ = await run_into(url, src, tmp_path / "o")
        assert code == 0
        assert "nothing to do" in out
        assert "has no lines" in out
        assert "every request succeeded" not in out

        # And a file whose every line an earlier run did says that, not "succeeded".
        full = write_jsonl(tmp_path / "in.jsonl", bodies(4))
        for _ in range(2):
            code, out, _ = await run_into(url, full, tmp_path / "o2")
    assert code == 0
    assert "nothing left to do: all 4 lines were done by earlier runs" in out


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Written:
    written = 0


def test_the_bar_counts_only_this_runs_work(tmp_path: Path) -> None:
    settings = build(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o"))
    counts = ReadCounts(total=100_000, read=60_000, skipped=59_000, empty=500)
    writer = _Written()
    progress = Progress(settings, counts, writer, Usage(), stream=_Terminal())  # type: ignore[arg-type]
    writer.written = 400
    progress._refresh_bar()
    bar = progress.bar
    assert bar is not None
    # 40,500 lines are this run's work, 400 of them done: not 59,900 of 100,000.
    assert (bar.n, bar.total) == (400, 40_500)
    assert "59,000 done before" in str(bar)
    progress.close()


def test_a_flag_typo_names_the_flag_meant(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["run", "--concurency", "5"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "unknown flag --concurency (did you mean --concurrency?)" in err
    assert "usage:" not in err  # one line, not the whole usage
    assert len(err.splitlines()) == 1


def test_a_request_key_one_edit_from_a_parameter_is_named(tmp_path: Path) -> None:
    job = job_file(tmp_path, "[request]\nmax_token = 5\ntemprature = 0.1\nmy_router_flag = true\n")
    settings = build(job, input="in.jsonl", output="out")
    assert len(settings.warnings) == 2
    assert "'max_token' is not a parameter the API knows; did you mean 'max_tokens'?" in settings.warnings[0]
    assert "did you mean 'temperature'?" in settings.warnings[1]
    assert settings.request["max_token"] == 5  # still sent as written: a server may know it


def test_version_and_exit_statuses_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"pipeline {pipeline.__version__}"
    for args in (["--help"], ["run", "--help"]):
        with pytest.raises(SystemExit):
            main(args)
        out = capsys.readouterr().out
        for status in ("0 ", "1 ", "2 ", "3 ", "130"):
            assert f"\n  {status}" in out


def test_every_flag_of_every_command_has_a_line_of_help() -> None:
    top = parser()
    commands = next(a for a in top._actions if a.dest == "command")
    assert commands.choices is not None
    for name, command in commands.choices.items():
        for action in command._actions:
            if action.dest != "help":
                assert action.help, f"pipeline {name} {'/'.join(action.option_strings) or action.dest}"


def test_a_command_builds_its_own_parser_alone_and_reads_its_flags_as_the_whole_parser_does() -> None:
    argvs = [
        ["run", "job.toml", "--input", "in.jsonl", "--rpm", "60", "--quiet", "--shard", "1/2"],
        ["estimate", "--input", "in.jsonl", "--tpm", "1000"],
        ["merge", "o", "--partial"],
        ["report", "o"],
        ["ray", "--input", "in.jsonl", "--shards", "3", "--cpus-per-shard", "0.5"],
        ["mock", "--port", "0", "--rpm", "600"],
    ]
    for argv in argvs:
        assert parser(argv[0]).parse_args(argv) == parser().parse_args(argv)
        own = next(a for a in parser(argv[0])._actions if a.dest == "command").choices
        whole = next(a for a in parser()._actions if a.dest == "command").choices
        assert own is not None
        assert whole is not None
        assert own[argv[0]].format_help() == whole[argv[0]].format_help()
        assert list(own) == [argv[0]]  # the others are not built


async def test_a_model_the_server_does_not_serve_fails_its_lines_without_sending_them(
    mock, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(300, model="vendor/no-such-model"))
    async with mock(unknown_models=("vendor/no-such-model",)) as (url, server):
        code, out, err = await run_into(url, src, tmp_path / "o", "--concurrency", "4")
    assert code == 1
    assert (out + err).count("the server does not serve model vendor/no-such-model") == 1  # said once
    errors = read_jsonl(tmp_path / "o/errors.jsonl")
    assert len(errors) == 300
    assert all("vendor/no-such-model" in e["error"]["message"] for e in errors)
    assert len(server.state.received) < 20  # the rest failed without being sent


async def test_404s_for_one_model_among_answers_fail_only_its_lines(mock, make_settings) -> None:
    rows = [{**body, "model": "gone/model" if i % 2 else "test/model"} for i, body in enumerate(bodies(20))]
    async with mock(unknown_models=("gone/model",)) as (url, _):
        summary = await pipeline.run(make_settings(url, rows, concurrency=1))
    assert (summary.succeeded, summary.failed, summary.exit_code) == (10, 10, 1)


async def test_a_bad_line_keeps_the_id_it_named(server, make_settings, tmp_path: Path) -> None:
    url, _ = server
    rows = [*bodies(2), {"custom_id": "named-1", "messages": "not a list"}, {"custom_id": 7, "model": "m"}]
    summary = await pipeline.run(make_settings(url, rows))
    assert summary.invalid_input == 2
    errors = {e["custom_id"]: e for e in read_jsonl(tmp_path / "out/errors.jsonl")}
    assert set(errors) == {"named-1", "7"}
    assert errors["named-1"]["error"]["message"].startswith("'messages' is a string")


def test_what_pip_install_leaves_is_ignored_by_git() -> None:
    for path in ("build/lib/pipeline/cli.py", "dist/pipeline-0.1.0.tar.gz", "pipeline.egg-info/PKG-INFO"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0, path


async def test_the_same_model_by_flag_or_by_job_file_is_the_same_job(mock, tmp_path: Path) -> None:
    job = job_file(tmp_path, '[request]\nmodel = "job/model"\n')
    src = write_jsonl(tmp_path / "in.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    async with mock() as (url, _):
        for extra in ([], ["--model", "job/model"]):
            code, _, err = await run_into(url, src, tmp_path / "o", *extra, job=job)
            assert code == 0, err


def test_the_progress_line_names_a_few_models_paces_however_many_have_one(tmp_path: Path) -> None:
    """Forty `:free` models found limited: the line names the slowest three and counts the rest."""
    settings = build(input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "o"))
    progress = Progress(settings, ReadCounts(total=10), _Written(), Usage(), stream=io.StringIO())  # type: ignore[arg-type]
    paces = {f"vendor/model-{i}:free": (1.0 + i / 100, "found", 1.0) for i in range(40)}
    progress.paces_of = lambda: paces
    line = progress.line()
    assert len(line) < 400
    assert "for 'vendor/model-0:free'" in line
    assert "37 more models paced on their own; account unpaced" in line
