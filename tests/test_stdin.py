"""`--input -`: the lines on standard input, as `psql ... | pipeline run --input -` gives them."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import orjson
import pytest

from pipeline.input.source import count_lines
from pipeline.input.stdin import STDIN
from pipeline.settings import build
from tests.conftest import FAKE_KEY, bodies, read_jsonl


async def piped(*args: str, lines: bytes | None = None, stdin: int | None = None) -> tuple[int, str, str]:
    """`pipeline ARGS` in a subprocess, `lines` written into its standard input."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline",
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is None else stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LUMENFALL_API_KEY": FAKE_KEY},
    )
    out, err = await proc.communicate(lines)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def jsonl(rows: list[object]) -> bytes:
    return b"".join((row if isinstance(row, bytes) else orjson.dumps(row)) + b"\n" for row in rows)


async def test_lines_piped_in_run_and_a_second_run_resumes(mock, tmp_path: Path) -> None:
    first = [*bodies(2), b"{not json", *bodies(1, start=2)]
    out = str(tmp_path / "tonight")
    async with mock() as (url, server):
        code, _, err = await piped(
            "run", "--input", "-", "--output", out, "--base-url", url, lines=jsonl(first)
        )
        assert code == 1, err  # the bad line failed; the three others are answered
        assert "<stdin>:3: " in err
        assert len(read_jsonl(tmp_path / "tonight/results.jsonl")) == 3
        # The same lines and two more, piped again into the same folder: a resume, not "a
        # different job", and only the two new lines are sent.
        code, _, err = await piped(
            "run",
            "--input",
            "-",
            "--output",
            out,
            "--base-url",
            url,
            lines=jsonl([*first, *bodies(2, start=3)]),
        )
        assert code == 1, err
        assert "different job" not in err
        assert len(server.state.received) == 5
    done = {row["custom_id"] for row in read_jsonl(tmp_path / "tonight/results.jsonl")}
    assert done == {f"job-{i}" for i in range(5)}
    assert "Traceback" not in err


async def test_estimate_reads_standard_input(tmp_path: Path) -> None:
    code, out, err = await piped("estimate", "--input", "-", lines=jsonl(bodies(4)))
    assert code == 0, err
    assert out.startswith("<stdin>: 4 lines: 4 requests to send")


async def test_a_terminal_on_standard_input_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    main, terminal = os.openpty()
    try:
        code, _, err = await piped(
            "run",
            "--input",
            "-",
            "--output",
            str(tmp_path / "o"),
            "--base-url",
            "http://127.0.0.1:9/v1",
            stdin=terminal,
        )
    finally:
        os.close(main)
        os.close(terminal)
    assert code == 2
    assert "standard input, which is a terminal here: pipe them in" in err


async def test_pipeline_ray_refuses_standard_input(tmp_path: Path) -> None:
    code, _, err = await piped(
        "ray", "--input", "-", "--shards", "2", "--output", str(tmp_path / "o"), lines=jsonl(bodies(2))
    )
    assert code == 2
    assert "standard input (--input -) is this process's alone: write the lines to a file" in err


def test_dash_in_a_job_file_is_standard_input_and_dot_slash_dash_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = tmp_path / "jobs/job.toml"
    job.parent.mkdir()
    job.write_text('input = "-"\noutput = "out"\n')
    settings = build(job)
    assert settings.input == STDIN
    assert settings.fingerprint()["input"] == "-"
    assert build(input="/dev/stdin", output="out").fingerprint()["input"] == "-"  # a resume
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-").write_bytes(jsonl(bodies(3)))
    named = build(input="./-", output="out").input
    assert named == tmp_path / "-"
    assert count_lines(named) == 3
    assert count_lines(STDIN) is None  # (read once, as it comes: never counted ahead)


async def test_a_closed_standard_input_is_refused_before_anything_is_sent(mock, tmp_path: Path) -> None:
    # `<&-`: fd 0 closed when Python starts, so the first file the run opens (the event
    # loop's own, before the input is checked) takes it: that is not standard input.
    async with mock() as (url, server):
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            'exec "$0" -m pipeline run --input - --output "$1" --base-url "$2" <&-',
            sys.executable,
            str(tmp_path / "o"),
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "LUMENFALL_API_KEY": FAKE_KEY},
        )
        _, err = await proc.communicate()
        assert not server.state.received
    assert proc.returncode == 2, err.decode()
    assert "--input -: there is no standard input (it is closed)" in err.decode()
    assert "Traceback" not in err.decode()
