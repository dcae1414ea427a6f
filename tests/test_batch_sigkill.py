"""A real SIGKILL at each step of a batch run: `pipeline run --tier batch` in a process of its
own, against the built-in mock served by this test, killed (SIGKILL: no `finally`, no
commit, no flush) while the mock holds the call of the step chosen (`MockConfig.batch_hang`:
the provider has acted, the run has not heard), then the same command again, into the same
folder, each run killed at the next step, until one runs to the end. Every input line must
end once in results.jsonl or errors.jsonl, and the mock's own counts must show no batch made
twice for a tag and no line answered twice: nothing paid twice."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.abc import Process

from tests.conftest import bodies, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parent.parent
LINES = 1100  # over two of the intake's runs of 512: half a result file is part taken in
PART = 511  # lines written before a kill in the results: one of the intake's runs of 512
PATIENCE = 30.0  # seconds a step may take to come on this shared machine, at most

# The steps each run is killed at, in turn (the last run goes to the end), by shape: held
# after the upload (the file stored), after the create (the batch made and paid for, its id
# never heard), at a look (following), and half way through the results (part taken in).
STEPS = {
    "files": ["upload", "create", "look", "content"],
    "inline": ["create", "look", "results"],
}


def _command(shape: str, folder: Path, data: Path, url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pipeline",
        "run",
        "--input",
        str(data),
        "--output",
        str(folder),
        "--base-url",
        url,
        "--tier",
        "batch",
        "--batch-api",
        shape,
        "--batch-poll",
        "0.05",
        "--max-attempts",
        "3",
        "--quiet",
    ]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(ROOT)
    return env


def _book(folder: Path) -> list[tuple[str, str | None]]:
    """The states and ids of the folder's batches, as its book (committed) holds them."""
    db = sqlite3.connect(folder / "ledger.sqlite")
    try:
        return list(db.execute("SELECT state, batch_id FROM batches ORDER BY n"))
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


async def _written(results: Path, lines: int) -> None:
    """Until another process has written `lines` lines to `results` (its file: there is no
    event to await, so it is looked at)."""
    while True:
        if len(read_jsonl(results)) >= lines:
            return
        await anyio.sleep(0.02)


async def _killed_at(process: Process, server: Any, step: str, results: Path) -> None:
    """Wait until the mock holds the step's call (a run that ends first is a failure), and at
    a step of the results until part of them is written (the run reads ahead of what it
    writes: the held call may come before a line is), then SIGKILL the run."""
    tally = server.state.batch
    async with anyio.create_task_group() as tg:

        async def ends() -> None:
            await process.wait()
            tg.cancel_scope.cancel()

        tg.start_soon(ends)
        with anyio.fail_after(PATIENCE):
            await tally.hanging.wait()
            if step in ("content", "results"):
                await _written(results, PART)
        process.send_signal(signal.SIGKILL)
        tg.cancel_scope.cancel()
    await process.wait()
    assert tally.hanging.is_set(), f"the run ended ({process.returncode}) before it reached {step}"
    assert process.returncode == -signal.SIGKILL


@pytest.mark.parametrize("shape", ["files", "inline"])
async def test_a_run_sigkilled_at_each_step_then_run_again_lands_every_line_once_and_pays_once(
    mock: Callable[..., Any], tmp_path: Path, shape: str
) -> None:
    rows = bodies(LINES)
    rows[7]["messages"][0]["content"] = "fail_me please"  # a 400 in the results: a failure
    data = write_jsonl(tmp_path / "input.jsonl", rows)
    folder = tmp_path / "out"
    async with mock(batch_api=shape, record=False) as (url, server):
        command = _command(shape, folder, data, url)
        states = []
        for step in STEPS[shape]:
            server.state.batch.hanging = anyio.Event()
            server.config.batch_hang = [step]
            process = await anyio.open_process(command, env=_env(), stdout=subprocess.DEVNULL)
            await _killed_at(process, server, step, folder / "results.jsonl")
            states.append((step, _book(folder)))
            if step in ("content", "results"):  # part taken in: written, committed or not
                assert len(read_jsonl(folder / "results.jsonl")) >= PART
        assert server.state.batch.hung == dict.fromkeys(STEPS[shape], 1)
        # What the kills left in the book: the batch committed creating before the call that
        # made it, its id unknown; found by its tag, then running.
        book = dict(states)
        assert book["create"] == [("creating", None)]
        assert book["look"][0][0] == "running"
        finished = await anyio.run_process(command, env=_env(), check=False)
        assert finished.returncode == 1, finished.stderr.decode()[-2000:]  # (the fail_me line)
        results = read_jsonl(folder / "results.jsonl")
        errors = read_jsonl(folder / "errors.jsonl")
        ids = [r["custom_id"] for r in results] + [e["custom_id"] for e in errors]
        assert len(ids) == len(set(ids)) == LINES
        assert set(ids) == {r["custom_id"] for r in rows}
        assert [e["custom_id"] for e in errors] == ["job-7"]
        stats = server.state.stats()["batch"]
        assert stats["batches_created"] == 1, stats  # found after the create, never made again
        assert stats["tags_twice"] == 0
        assert stats["lines_answered_twice"] == 0
        assert stats["lines_answered"] == LINES - 1


async def test_a_run_sigkilled_while_staging_stages_again_and_sends_each_line_once(
    mock: Callable[..., Any], tmp_path: Path
) -> None:
    # The reader held at a line whose image is a pipe no one writes to (the test opens it, so
    # it knows when the run is there): lines before it are in the batch file filling.
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (0, 200, 0)).save(tmp_path / "img" / "a.png")
    pipe = tmp_path / "img" / "held.png"
    os.mkfifo(pipe)
    job = tmp_path / "job.toml"
    job.write_text(
        '[request]\nmodel = "vision/model"\nmax_tokens = 50\n'
        '[template]\nid = "{asset_id}"\n[[template.messages]]\nrole = "user"\n'
        'content = [{ type = "text", text = "Alt text for {asset_id}" }, '
        '{ type = "image", path = "image_path" }]\n'
    )
    rows = [{"asset_id": f"a{i}", "image_path": "img/a.png"} for i in range(150)]
    rows[120]["image_path"] = "img/held.png"
    data = write_jsonl(tmp_path / "input.jsonl", rows)
    folder = tmp_path / "out"
    async with mock(batch_api="files", record=False) as (url, server):
        command = _command("files", folder, data, url)
        command.insert(4, str(job))  # (pipeline run JOB ...)
        process = await anyio.open_process(command, env=_env(), stdout=subprocess.DEVNULL)
        with anyio.fail_after(PATIENCE):  # (the open returns once the run opens it too)
            held = await anyio.to_thread.run_sync(os.open, pipe, os.O_WRONLY, abandon_on_cancel=True)
        try:
            assert (folder / "batches" / "1.jsonl").exists()  # filling
            process.send_signal(signal.SIGKILL)
            await process.wait()
        finally:
            os.close(held)
        assert process.returncode == -signal.SIGKILL
        assert server.state.stats()["batch"]["files_uploaded"] == 0
        pipe.unlink()
        pipe.write_bytes((tmp_path / "img" / "a.png").read_bytes())
        finished = await anyio.run_process(command, env=_env(), check=False)
        assert finished.returncode == 0, finished.stderr.decode()[-2000:]
        ids = [r["custom_id"] for r in read_jsonl(folder / "results.jsonl")]
        assert sorted(ids) == sorted(f"a{i}" for i in range(150))
        assert read_jsonl(folder / "errors.jsonl") == []
        stats = server.state.stats()["batch"]
        assert (stats["batches_created"], stats["lines_answered"], stats["lines_answered_twice"]) == (
            1,
            150,
            0,
        )
