"""Exactly once at the batch tier, whatever is killed when: the batch run is killed at every
step of a clean run in turn (each call to the provider, before and after a batch is made,
and each line of every result file), then run again; every input line must end once in
results.jsonl or errors.jsonl, and the provider must have run no line more often than its
fate asks (nothing paid twice)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.run.runner import run
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeHost, Killed, at_batch_tier

# Each line's fate at the n-th batch it is in, and how many batches it must be run in.
FATES: dict[str, tuple[list[str], int]] = {
    # Its batch fails validation, naming it: it fails, never run; job-1 and job-2 go again.
    "job-0": (["invalid"], 0),
    "job-1": (["500", "ok"], 2),  # a server error: again, in a new batch
    "job-2": (["expired", "ok"], 2),  # a batch that expired before it: again
    "job-3": (["400"], 1),  # a request the server refuses: a failure, never again
    "job-4": (["stranger"], 1),  # answered, with a line for an id never sent (refused)
    "job-5": (["twice"], 1),  # answered twice (the second refused)
    "job-6": (["missing", "missing", "ok"], 3),  # never answered, twice
}


def fate(custom_id: str, n: int) -> str:
    fates = FATES.get(custom_id, (["ok"], 1))[0]
    return fates[min(n, len(fates)) - 1]


def _killed(error: BaseException) -> bool:
    if isinstance(error, Killed):
        return True
    return isinstance(error, BaseExceptionGroup) and any(_killed(e) for e in error.exceptions)


def _check(folder: Path, rows: list[dict[str, Any]], api: FakeBatchApi, *, runs: int = 1) -> None:
    results = read_jsonl(folder / "results.jsonl")
    errors = read_jsonl(folder / "errors.jsonl")
    ids = [r["custom_id"] for r in results] + [e["custom_id"] for e in errors]
    assert sorted(ids) == sorted(r["custom_id"] for r in rows)
    failed = {e["custom_id"]: e for e in errors}
    assert sorted(failed) == ["job-0", "job-3"]
    assert failed["job-0"]["error"]["code"] == "invalid_request"
    assert failed["job-3"]["response"]["status_code"] == 400
    for row in rows:
        custom_id = row["custom_id"]
        if custom_id == "job-3":
            # A failed line is tried again by the next run into the folder, as at the
            # synchronous tier: once a run that reached it.
            assert 1 <= api.ran[custom_id] <= runs
            continue
        assert api.ran[custom_id] == FATES.get(custom_id, ([], 1))[1], custom_id


async def test_a_kill_at_every_step_leaves_every_line_once_and_nothing_paid_twice(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    rows = bodies(7) + bodies(3, model="other/model", start=7)
    # (3: job-6 needs three batches; one with job-0 in it spends none of its tries)
    settings = at_batch_tier(make_settings(server[0], rows, max_attempts=3))
    clean = FakeBatchApi(max_lines=3, fate=fate)
    summary = await run(settings, FakeHost(clean))
    assert summary.exit_code == 1, summary.message  # job-3 failed
    _check(settings.folder, rows, clean)
    assert "2 result line(s) refused" in summary.message
    steps = clean.steps
    assert steps > 20
    for k in range(1, steps + 1):
        folder = tmp_path / f"out-{k}"
        again = at_batch_tier(settings, output=folder)
        api = FakeBatchApi(max_lines=3, fate=fate)
        api.die_at = k
        with pytest.raises(BaseException) as info:  # noqa: PT011 -- a kill, by any path out
            await run(again, FakeHost(api))
        assert _killed(info.value), info.value
        killed_at = api.step_names[-1]
        summary = await run(again, FakeHost(api))
        assert summary.exit_code == 1, (k, killed_at, summary.message)
        try:
            _check(folder, rows, api, runs=2)
        except AssertionError as e:
            raise AssertionError(f"killed at step {k} ({killed_at}): {e}") from e
