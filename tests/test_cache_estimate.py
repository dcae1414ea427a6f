"""`pipeline estimate --cache DIR` (issue 23, point 2): the requests whose answer the cache
holds now, counted exactly as a run would take them, and what they cost when bought, off the
estimate; read only (a read-only cache folder too), and a missing one said."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from pipeline.estimate import estimate, print_estimate
from pipeline.run.runner import run
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl, write_jsonl

PRICES = {"test/model": {"prompt": 1.0, "completion": 2.0}}


async def _half_cached(
    make_settings: Callable[..., Settings], url: str, tmp_path: Path
) -> tuple[Path, float]:
    """A cache holding the answers of job-0..job-4 of ten lines; what they cost."""
    cache = tmp_path / "cache"
    first = make_settings(url, bodies(5), cache=str(cache), prices=PRICES, output=tmp_path / "first")
    assert (await run(first)).exit_code == 0
    paid = orjson.loads((first.folder / "usage.json").read_bytes())["cost"]["total"]
    return cache, paid


def _estimate(settings: Settings) -> tuple[Any, str]:
    out = io.StringIO()
    result = estimate(settings)
    print_estimate(result, out=out, err=io.StringIO())
    return result, out.getvalue()


async def test_the_lines_the_cache_answers_are_counted_apart_and_what_they_cost(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    cache, paid = await _half_cached(make_settings, server[0], tmp_path)
    rows = bodies(10)
    rows[1] = {**rows[1], "temperature": 0.5}  # another request than the one answered: sent
    settings = make_settings(server[0], rows, cache=str(cache), prices=PRICES, output=tmp_path / "next")
    result, said = _estimate(settings)
    assert result.cached.hits == 4
    assert result.requests == 6  # the rest, the only ones costed
    costs = {
        r["custom_id"]: r["response"]["body"]["usage"]["cost"]
        for r in read_jsonl(tmp_path / "first/results.jsonl")
    }
    assert sum(costs.values()) == pytest.approx(paid)
    assert result.cached.cost == pytest.approx(paid - costs["job-1"])  # what they cost when bought
    assert "4 requests have their answer there" in said
    assert "the other 6" in said
    assert "10 lines: 6 requests to send" in said
    # Against another endpoint, none is an answer: a run there would send them all.
    elsewhere = make_settings("http://127.0.0.1:9/v1", rows, cache=str(cache), prices=PRICES)
    assert _estimate(elsewhere)[0].cached.hits == 0


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """`folder` and its files as no process may change them (root too: immutable)."""
    paths = [*folder.iterdir(), folder]
    for path in paths:
        path.chmod(0o555 if path.is_dir() else 0o444)
    locked: list[Path] = []
    try:
        if os.geteuid() == 0:
            if shutil.which("chattr") is None:
                pytest.skip("root, and no chattr to make the folder read-only for root")
            for path in paths:
                done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, check=False)
                if done.returncode != 0:
                    pytest.skip(f"chattr +i failed here: {done.stderr.decode().strip()}")
                locked.append(path)
        yield
    finally:
        for path in locked:
            subprocess.run(["chattr", "-i", str(path)], check=False)
        for path in paths:
            path.chmod(0o755 if path.is_dir() else 0o644)


async def test_a_read_only_cache_is_read_and_left_as_it_was(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    cache, _ = await _half_cached(make_settings, server[0], tmp_path)
    before = {p.name: p.read_bytes() for p in cache.iterdir()}
    settings = make_settings(server[0], bodies(10), cache=str(cache), prices=PRICES, output=tmp_path / "next")
    with _read_only(cache):
        result, said = _estimate(settings)
    assert result.cached.hits == 5, said
    assert "5 requests have their answer there" in said
    assert "cannot be read" not in said
    assert {p.name: p.read_bytes() for p in cache.iterdir()} == before


async def test_a_missing_cache_folder_is_said_and_every_request_counted(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(3))
    settings = make_settings("http://127.0.0.1:9/v1", input=src, cache=str(tmp_path / "nowhere"))
    result, said = _estimate(settings)
    assert result.requests == 3
    assert f"--cache: no folder {tmp_path / 'nowhere'}" in said
    assert not (tmp_path / "nowhere").exists()  # not made


async def test_a_line_with_a_local_image_is_found_by_its_bytes_as_sent_at_every_tier(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    from tests.fakebatchapi import FakeBatchApi, FakeHost, at_batch_tier
    from tests.test_images import job, jpeg

    (tmp_path / "a.jpg").write_bytes(jpeg(3000, 2000))  # resized as sent: the key is of what is sent
    (tmp_path / "b.jpg").write_bytes(jpeg(2000, 3000))
    rows = [{"asset_id": "a", "image_path": "a.jpg"}, {"asset_id": "b", "image_path": "b.jpg"}]
    cache = str(tmp_path / "cache")
    first = make_settings(
        server[0],
        job=job(tmp_path, max_side=1024),
        input=write_jsonl(tmp_path / "one.jsonl", rows[:1]),
        cache=cache,
    )
    assert (await run(first)).exit_code == 0
    both = make_settings(
        server[0],
        job=job(tmp_path, max_side=1024),
        input=write_jsonl(tmp_path / "two.jsonl", rows),
        cache=cache,
        output=tmp_path / "both",
    )
    result, said = _estimate(both)
    assert result.cached.hits == 1, said
    assert result.requests == 1
    api = FakeBatchApi()
    summary = await run(at_batch_tier(both), FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert list(api.ran) == ["b"]  # a's answer taken from the cache, its image inlined as the run sent it
    assert summary.reused == 1
    # The same path, other bytes: another request.
    (tmp_path / "a.jpg").write_bytes(jpeg(3000, 2001))
    assert _estimate(both)[0].cached.hits == 0


async def test_an_estimate_leaves_no_file_beside_a_cache_no_process_has_open(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    # A read-only connection to a WAL file makes its -wal and -shm files and cannot remove
    # them: made by `sudo pipeline estimate`, root's, they would turn the owner's cache off.
    cache, _ = await _half_cached(make_settings, server[0], tmp_path)
    before = sorted(p.name for p in cache.iterdir())
    assert before == ["answers.sqlite"]  # (the run closed it: its WAL checkpointed, gone)
    settings = make_settings(server[0], bodies(10), cache=str(cache), prices=PRICES, output=tmp_path / "next")
    result, said = _estimate(settings)
    assert result.cached.hits == 5, said
    assert sorted(p.name for p in cache.iterdir()) == before


async def test_a_cache_of_another_format_is_said_and_counts_nothing(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    import sqlite3

    cache, _ = await _half_cached(make_settings, server[0], tmp_path)
    with contextlib.closing(sqlite3.connect(cache / "answers.sqlite")) as db:
        db.execute("UPDATE meta SET value = 99 WHERE name = 'format'")
        db.commit()
    settings = make_settings(server[0], bodies(10), cache=str(cache), prices=PRICES, output=tmp_path / "next")
    result, said = _estimate(settings)
    # A run would not use it (`AnswerCache` turns itself off): all ten are to be sent.
    assert result.cached.hits == 0
    assert result.requests == 10
    assert "format 99" in said, said
    summary = await run(settings)
    assert summary.reused == 0


async def test_a_run_reuses_a_read_only_cache_as_the_estimate_said(
    make_settings: Callable[..., Settings],
    server: tuple[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The estimate counts a read-only cache's answers as not to be spent: a run takes them
    # (and keeps none), where it turned the cache off and bought all ten.
    cache, _ = await _half_cached(make_settings, server[0], tmp_path)
    sent = len(server[1].state.received)
    settings = make_settings(server[0], bodies(10), cache=str(cache), prices=PRICES, output=tmp_path / "next")
    with _read_only(cache):
        assert _estimate(settings)[0].cached.hits == 5
        capsys.readouterr()
        summary = await run(settings)
    assert summary.exit_code == 0, summary.message
    assert summary.reused == 5
    assert len(server[1].state.received) - sent == 5
    said = capsys.readouterr().err
    assert said.count("warning: answer cache") == 1, said
    assert "answers can no longer be kept" in said


async def test_a_cache_path_that_is_a_file_is_said_unreadable_not_missing(
    make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    (tmp_path / "answers").write_text("a file, where the cache folder should be")
    src = write_jsonl(tmp_path / "in.jsonl", bodies(3))
    settings = make_settings("http://127.0.0.1:9/v1", input=src, cache=str(tmp_path / "answers"))
    result, said = _estimate(settings)
    assert result.requests == 3
    assert "cannot be read (Not a directory)" in said, said
