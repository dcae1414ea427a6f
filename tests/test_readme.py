"""Every code block in the README runs as written.

Shell blocks run in bash in a copy of the repository's jobs and samples (with the repository's
`.venv`), against the built-in mock: each `pipeline run` or `estimate` gets `--base-url` to it,
the only change, but for a run at `--tier batch`, which looks at its batches every 0.2 s
rather than 30 (the mock's batches end at once: the test would only wait). `make` lines are checked with `make -n` (`make test` would run this test).
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
from typing import Any

import pytest

import pipeline.settings
from pipeline.settings import build
from tests.conftest import FAKE_KEY, _free_port

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"^```(\w*)\n(.*?)^```", README, flags=re.M | re.S)
PIPELINE = re.compile(r"(\S*pipeline (?:run|estimate)\b[^\n]*)")


def _blocks(*langs: str) -> list[str]:
    return [code for lang, code in BLOCKS if lang in langs]


def test_every_block_says_what_it_is() -> None:
    assert BLOCKS
    for lang, code in BLOCKS:
        assert lang in ("sh", "python", "toml", "text", "crontab", "yaml", "slurm"), (
            f"a block without a kind:\n{code}"
        )


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


README_STORE = "redis://127.0.0.1:6379/0"


def _pointed(command: str, url: str) -> str:
    """A pipeline command line, sent to the mock: --base-url added (before a trailing &)."""
    command = command.split(" #")[0].rstrip()
    background = command.endswith("&")
    command = command.rstrip("&").rstrip()
    if "--tier batch" in command and "--batch-poll" not in command:
        command += " --batch-poll 0.2"
    return f"{command} --base-url {url}" + (" &" if background else "")


def _run_shell(
    script: str, cwd: Path, url: str, store: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    script = PIPELINE.sub(lambda m: _pointed(m.group(1), url), script)
    if store is not None:
        script = script.replace(README_STORE, store)
    env = {**os.environ, "LUMENFALL_API_KEY": FAKE_KEY, **(env or {})}
    env["PATH"] = f"{cwd / '.venv/bin'}:{env['PATH']}"
    return subprocess.run(
        ["bash", "-e", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("code", _blocks("sh"), ids=lambda code: code.split("\n", 1)[0][:40])
def test_shell_blocks_run(code: str, repo_copy: Path, mock_url: str, request: pytest.FixtureRequest) -> None:
    if code.lstrip().startswith("make"):
        for line in code.splitlines():
            target = line.split("#")[0].split()
            done = subprocess.run(["make", "-n", *target[1:]], cwd=ROOT, capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        return
    store = request.getfixturevalue("redis_server").url if README_STORE in code else None
    done = _run_shell(code, repo_copy, mock_url, store)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def _shards_then_merge(
    commands: list[tuple[str, dict[str, str]]], cwd: Path, url: str, store: str, out: Path
) -> None:
    """Run each shard's command at once, as the cluster would, then merge: all 30 lines."""
    procs = []
    for script, env in commands:
        script = PIPELINE.sub(lambda m: _pointed(m.group(1), url), script.replace(README_STORE, store))
        full = {
            **os.environ,
            "LUMENFALL_API_KEY": FAKE_KEY,
            **env,
            "PATH": f"{cwd / '.venv/bin'}:{os.environ['PATH']}",
        }
        procs.append(subprocess.Popen(["sh", "-c", script], cwd=cwd, env=full))
    assert [p.wait(timeout=120) for p in procs] == [0] * len(procs)
    merged = subprocess.run(
        [str(cwd / ".venv/bin/pipeline"), "merge", str(out)], capture_output=True, text=True
    )
    assert merged.returncode == 0, merged.stderr
    lines = (cwd / "samples/prompts.jsonl").read_text().splitlines()
    assert len((out / "results.jsonl").read_text().splitlines()) == len([x for x in lines if x.strip()])


@pytest.mark.parametrize("code", _blocks("yaml"))
def test_the_kubernetes_job_runs_its_shards(
    code: str, repo_copy: Path, mock_url: str, redis_server: Any
) -> None:
    found = re.search(r'command: \["sh", "-c", "(.*)"\]', code)
    assert found, "the Job's command"
    assert "completionMode: Indexed" in code
    assert "secretKeyRef" in code
    assert FAKE_KEY not in code
    completions = int(re.search(r"completions: (\d+)", code).group(1))  # type: ignore[union-attr]
    command = found.group(1).replace("/data/", f"{repo_copy}/data/")
    command = re.sub(r"redis://\S+", README_STORE, command)  # the cluster's Redis: ours here
    metrics = re.search(r"--metrics-port (\d+)", command)
    assert metrics, "each shard's metrics"
    assert f"containerPort: {metrics[1]}" in code
    assert f'prometheus.io/port: "{metrics[1]}"' in code
    # (a pod has an IP of its own; the shards here share one: a port each)
    commands = [
        (command.replace(metrics[0], f"--metrics-port {_free_port()}"), {"JOB_COMPLETION_INDEX": str(i)})
        for i in range(completions)
    ]
    _shards_then_merge(commands, repo_copy, mock_url, redis_server.url, repo_copy / "data/out/nightly")


@pytest.mark.parametrize("code", _blocks("slurm"))
def test_the_slurm_array_runs_its_shards(
    code: str, repo_copy: Path, mock_url: str, redis_server: Any
) -> None:
    assert "#SBATCH" in code
    commands = [(code, {"SLURM_ARRAY_TASK_ID": str(k)}) for k in range(1, 5)]
    _shards_then_merge(commands, repo_copy, mock_url, redis_server.url, repo_copy / "out/sharded")


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
