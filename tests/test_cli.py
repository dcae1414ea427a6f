"""`pipeline` as a user runs it: a subprocess, its exit status and what it prints."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

from tests.conftest import FAKE_KEY, bodies, read_jsonl, write_jsonl


async def pipeline(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pipeline",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LUMENFALL_API_KEY": FAKE_KEY, **(env or {})},
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_run_against_a_loopback_server(mock, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(300))
    async with mock(latency=0.005) as (url, server):
        code, out, err = await pipeline(
            "run",
            "--input",
            str(src),
            "--output",
            str(tmp_path / "o"),
            "--base-url",
            url,
            "--concurrency",
            "64",
        )
    assert code == 0, err
    assert "300 succeeded" in out
    assert len(read_jsonl(tmp_path / "o/results.jsonl")) == 300
    assert server.state.max_in_flight <= 64
    assert "Traceback" not in err
    assert FAKE_KEY not in out + err


async def test_quiet_prints_one_summary_line(mock, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(5))
    async with mock() as (url, _):
        code, out, err = await pipeline(
            "run", "--input", str(src), "--output", str(tmp_path / "o"), "--base-url", url, "--quiet"
        )
    assert code == 0
    assert out.count("\n") == 1
    assert out.startswith("pipeline: exit 0 | 5 succeeded")
    assert err == ""


async def test_a_wrong_job_file_exits_2_and_sends_nothing(mock, tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('input = "in.jsonl"\noutput = "o"\nconcurrancy = 3\n')
    write_jsonl(tmp_path / "in.jsonl", bodies(2))
    async with mock() as (url, server):
        code, _out, err = await pipeline("run", str(job), "--base-url", url)
    assert code == 2
    assert "unknown key 'concurrancy' (did you mean 'concurrency'?)" in err
    assert server.state.received == []
    assert "Traceback" not in err


async def test_a_missing_input_exits_2(tmp_path: Path) -> None:
    code, _, err = await pipeline(
        "run", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "o")
    )
    assert code == 2
    assert "nope.jsonl" in err
    assert "not found" in err


async def test_a_base_url_that_is_not_http_exits_2(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(1))
    code, _, err = await pipeline(
        "run", "--input", str(src), "--output", str(tmp_path / "o"), "--base-url", "localhost:8080"
    )
    assert code == 2
    assert "not an http(s) URL" in err


async def test_an_unreachable_endpoint_exits_3_without_a_traceback(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(3))
    url = f"http://127.0.0.1:{free_port()}/v1"
    code, out, err = await pipeline(
        "run", "--input", str(src), "--output", str(tmp_path / "o"), "--base-url", url, "--give-up-after", "1"
    )
    assert code == 3
    # Tried again for a while first (an outage as a run starts is waited for as a later one),
    # and said at once, so that a wrong port is not a silent wait.
    assert "cannot reach 127.0.0.1" in err
    assert "trying again for up to 1s" in err
    assert "tried for 1s); check --base-url and the network" in out + err
    assert "Traceback" not in err


async def test_no_key_for_a_remote_endpoint_exits_2(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(1))
    code, _, err = await pipeline(
        "run", "--input", str(src), "--output", str(tmp_path / "o"), env={"LUMENFALL_API_KEY": ""}
    )
    assert code == 2
    assert "set the environment variable LUMENFALL_API_KEY" in err


# Run as `python -c`: the modules a run imported, written out once it ends.
IMPORTED = """
import sys
from pipeline.cli import main
code = main(sys.argv[1:-1])
with open(sys.argv[-1], "w") as f:
    f.write("\\n".join(sys.modules))
sys.exit(code)
"""


async def test_a_plain_run_imports_no_module_of_what_it_does_not_use(mock, tmp_path: Path) -> None:
    """Start-up is part of every run: a run by flags on a plain .jsonl, its report written,
    imports nothing for gzip, the mock's command, the other commands, a job file, a verdict,
    images or a shared pace (html and html.entities: 7.6 million instructions, callgrind)."""
    src = write_jsonl(tmp_path / "in.jsonl", bodies(5))
    listed = tmp_path / "modules.txt"
    async with mock() as (url, _):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            IMPORTED,
            *("run", "--input", str(src), "--output", str(tmp_path / "o"), "--base-url", url, "--quiet"),
            str(listed),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "LUMENFALL_API_KEY": FAKE_KEY},
        )
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert out.decode().startswith("pipeline: exit 0 | 5 succeeded")
    assert (tmp_path / "o/report.html").exists()
    imported = set(listed.read_text().split())
    assert "pipeline.run.runner" in imported
    unused = {"gzip", "html", "html.entities", "difflib", "tomllib", "jsonschema", "PIL", "redis", "ray"}
    unused |= {
        "pipeline.mock.command",
        "pipeline.estimate",
        "pipeline.output.merge",
        "pipeline.report.rebuild",
    }
    assert imported & unused == set()
