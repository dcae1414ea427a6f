"""Every code block in the README runs as written.

Shell blocks run in bash in a copy of the repository's jobs and samples (with the repository's
`.venv`), against the built-in mock: each `pipeline run` or `estimate` gets `--base-url` to it,
the only change. `make` lines are checked with `make -n` (`make test` would run this test).
Python blocks run with the default endpoint pointed at the mock. TOML blocks go into a job
file, which must be valid. `text` blocks are synopses and layouts, read, not run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import pipeline.settings
from pipeline.settings import build
from tests.conftest import FAKE_KEY

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.M | re.S)
PIPELINE = re.compile(r"(\S*pipeline (?:run|estimate)\b[^\n]*)")


def _blocks(*langs: str) -> list[str]:
    return [code for lang, code in BLOCKS if lang in langs]


def test_every_block_says_what_it_is() -> None:
    assert BLOCKS
    for lang, code in BLOCKS:
        assert lang in ("sh", "python", "toml", "text", "crontab"), f"a block without a kind:\n{code}"


@pytest.fixture(scope="module")
def mock_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port_file = tmp_path_factory.mktemp("mock") / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "mock", "--port", "0", "--port-file", str(port_file), "--quiet"]
    )
    try:
        for _ in range(200):
            if port_file.exists() and port_file.read_text().strip():
                break
            subprocess.run(["sleep", "0.05"], check=True)
        yield f"http://127.0.0.1:{port_file.read_text().strip()}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    for name in ("jobs", "samples"):
        shutil.copytree(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    return tmp_path


def _run_shell(script: str, cwd: Path, url: str) -> subprocess.CompletedProcess[str]:
    script = PIPELINE.sub(lambda m: f"{m.group(1).split('#')[0].rstrip()} --base-url {url}", script)
    env = {**os.environ, "LUMENFALL_API_KEY": FAKE_KEY}
    return subprocess.run(
        ["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("code", _blocks("sh"), ids=lambda code: code.split("\n", 1)[0][:40])
def test_shell_blocks_run(code: str, repo_copy: Path, mock_url: str) -> None:
    if code.lstrip().startswith("make"):
        for line in code.splitlines():
            target = line.split("#")[0].split()
            done = subprocess.run(["make", "-n", *target[1:]], cwd=ROOT, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        return
    done = _run_shell(code, repo_copy, mock_url)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("code", _blocks("crontab"))
def test_crontab_lines_run(code: str, repo_copy: Path, mock_url: str) -> None:
    for line in code.strip().splitlines():
        command = line.split(None, 5)[5]
        command = re.sub(r"^cd \S+ && ", "", command)  # the folder is the copy's
        done = _run_shell(command, repo_copy, mock_url)
        assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("code", _blocks("python"))
def test_python_blocks_run(
    code: str,
    repo_copy: Path,
    mock_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(repo_copy)
    monkeypatch.setenv("LUMENFALL_API_KEY", FAKE_KEY)
    monkeypatch.setattr(pipeline.settings, "DEFAULT_BASE_URL", mock_url)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    assert capsys.readouterr().out.startswith("0 ")  # exit code 0, then the figures


def test_the_python_example_says_what_is_wrong_without_a_key(
    repo_copy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (code,) = _blocks("python")
    monkeypatch.chdir(repo_copy)
    monkeypatch.delenv("LUMENFALL_API_KEY", raising=False)
    with pytest.raises(SystemExit, match="pipeline: no API key: set the environment variable"):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})


@pytest.mark.parametrize("code", _blocks("toml"))
def test_toml_blocks_are_valid_job_files(code: str, tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text(code)
    build(job, input="in.jsonl", output="out")
