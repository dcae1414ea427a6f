"""Every place the batch run writes (its staged files, its book in the ledger, the results it
takes in), made to fail in turn (tests/inject.py finds the places: EIO, a full disk, a
cancellation there, a commit that holds though SQLite says it failed), then the same command
again until it finishes: every line ends once in results.jsonl or errors.jsonl, and the
provider ran no line more often than its fate asks (nothing paid twice)."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from pipeline.errors import RunStopped
from pipeline.report import markdown as markdown_module
from pipeline.run.runner import run
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeHost, at_batch_tier
from tests.inject import INJECTOR, cancelling, faults, installed
from tests.test_batch_kill import FATES, fate

CANCELLED = -1


def _problems(folder: Path, rows: list[dict[str, Any]], api: FakeBatchApi, runs: int) -> list[str]:
    problems = []
    results = read_jsonl(folder / "results.jsonl")
    errors = read_jsonl(folder / "errors.jsonl")
    ids = Counter([r["custom_id"] for r in results] + [e["custom_id"] for e in errors])
    for row in rows:
        if ids[row["custom_id"]] != 1:
            problems.append(f"{row['custom_id']} is in the files {ids[row['custom_id']]} times")
    for row in rows:
        custom_id = row["custom_id"]
        most = runs if custom_id == "job-3" else FATES.get(custom_id, ([], 1))[1]
        if api.ran[custom_id] > most:
            problems.append(f"{custom_id} was run {api.ran[custom_id]} times, {most} at most")
    return problems


async def _go(settings: Settings, api: FakeBatchApi) -> tuple[int, str]:
    code, message = CANCELLED, ""
    with anyio.CancelScope() as scope:
        INJECTOR.cancel = cancelling(scope)
        try:
            summary = await run(settings, FakeHost(api))
            code, message = summary.exit_code, summary.message
        except RunStopped as e:  # (the command line's exit 3: a folder that takes no more)
            code, message = 3, str(e)
        except Exception as e:
            code, message = 70, f"{type(e).__name__}: {e}"
    INJECTOR.cancel = None
    return code, message


async def test_every_write_of_the_batch_run_fails_in_turn_and_every_line_still_ends_once(
    make_settings: Callable[..., Settings],
    server: tuple[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(markdown_module, "html_report", lambda doc: "<html></html>")  # charts: slow
    rows = bodies(7)
    base = at_batch_tier(make_settings(server[0], rows, max_attempts=3))
    began = time.monotonic()
    problems: list[str] = []
    runs = 0
    with installed():
        api = FakeBatchApi(max_lines=3, fate=fate)
        assert (await _go(at_batch_tier(base, output=tmp_path / "clean"), api))[0] == 1
        # The sites of the batch run's own (a frame of pipeline/batch/ in their call), each failed
        # at its first call with each fault, and at one mid-way (where it is called more than
        # once) with a cancellation, the subtlest (the suite's time is shared: an I/O error
        # mid-way stops the run as at the first call).
        reached = Counter({s: n for s, n in INJECTOR.hits.items() if any("batch/" in w for w in s.where)})
        targets = [(site, 1, fault) for site in sorted(reached) for fault in faults(site)]
        targets += [
            (site, (count + 1) // 2, fault)
            for site, count in sorted(reached.items())
            if count > 1
            for fault in ("cancel",)
        ]
        for k, (site, nth, fault) in enumerate(targets):
            settings = at_batch_tier(base, output=tmp_path / f"out-{k}")
            api = FakeBatchApi(max_lines=3, fate=fate)
            INJECTOR.arm((site, nth, fault))
            said = f"{fault} at call {nth} of {site}"
            for attempt in range(4):
                code, message = await _go(settings, api)
                runs += 1
                if code not in (0, 1, 3, CANCELLED):
                    problems.append(f"{said}: run {attempt + 1}: exit {code}: {message}")
                if code in (0, 1) and (attempt > 0 or site not in INJECTOR.fired):
                    break
                INJECTOR.disarm()
            else:
                problems.append(f"{said}: the reruns did not finish: exit {code}: {message}")
            INJECTOR.disarm()
            problems += [f"{said}: {p}" for p in _problems(settings.folder, rows, api, attempt + 1)]
    with capsys.disabled():
        print(
            f"\nbatch write faults: {len(reached)} sites, {len(targets)} faulted runs, {runs} runs, "
            f"{len(problems)} problems, {time.monotonic() - began:.1f}s"
        )
        for problem in problems[:30]:
            print("  " + problem)
    assert len(reached) >= 5
    assert problems == []
