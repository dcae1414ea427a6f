"""Shards of one job, each a folder of its own, and their merge: what one process would have
written, exactly once, whatever was killed on the way."""

from __future__ import annotations

import asyncio
import random
import shutil
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

import pipeline
from pipeline.cli import main
from pipeline.errors import SettingsError
from pipeline.input.reader import stable_id
from pipeline.input.shard import Shard, parse_shard
from pipeline.output.ledger import Ledger
from pipeline.output.merge import merge
from tests.conftest import bodies, read_jsonl, write_jsonl
from tests.test_crash import start, whole_lines


def rows() -> list[Any]:
    lines: list[Any] = bodies(60)
    same = {"model": "test/model", "messages": [{"role": "user", "content": "no id, three times"}]}
    lines += [same, same, same]  # no custom_id: derived ids, copies numbered alike in every shard
    lines += [
        {"model": "test/model", "messages": [{"role": "user", "content": f"anon {i}"}]} for i in range(20)
    ]
    lines += [b"{not json", {"custom_id": "bad-1", "messages": "not a list"}]
    return lines


def by_id(path: Path) -> dict[str, dict[str, Any]]:
    return {r["custom_id"]: r["response"]["body"] for r in read_jsonl(path)}


def test_the_shard_of_an_id_is_fixed_on_every_machine() -> None:
    # BLAKE2b of the id, not Python's salted hash(): pinned, so that a change is seen.
    owners = [next(k for k in range(1, 5) if Shard(k, 4).owns(f"job-{i}")) for i in range(8)]
    assert owners == [1, 4, 3, 1, 4, 1, 3, 1]
    assert parse_shard("2/4") == Shard(2, 4)
    for bad in ("0/4", "5/4", "2", "a/b"):
        with pytest.raises(SettingsError, match="shard"):
            parse_shard(bad)


async def test_four_shards_merged_equal_one_process(mock, make_settings, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", rows())
    out = tmp_path / "sharded"
    async with mock() as (url, _):
        one = await pipeline.run(make_settings(url, input=src, output=tmp_path / "one"))
        summaries = [
            await pipeline.run(make_settings(url, input=src, output=out, shard=f"{k}/4")) for k in range(1, 5)
        ]
    assert [s.exit_code for s in summaries] == [1, 0, 0, 0]  # the two bad lines fail in shard 1
    assert sum(s.succeeded for s in summaries) == one.succeeded == 83
    assert [s.invalid_input for s in summaries] == [2, 0, 0, 0]  # bad lines: shard 1 only
    assert all(s.pending == 0 for s in summaries)
    merged = merge(out)
    assert (merged.results, merged.errors, merged.pending) == (83, 2, 0)
    assert by_id(out / "results.jsonl") == by_id(tmp_path / "one/results.jsonl")
    usage_one = read_jsonl_doc(tmp_path / "one/usage.json")
    usage_merged = read_jsonl_doc(out / "usage.json")
    assert usage_merged["tokens"] == usage_one["tokens"]
    assert usage_merged["requests"]["succeeded"] == 83
    assert [e["line"] for e in read_jsonl(out / "errors.jsonl")] == [84, 85]
    assert read_jsonl(out / "errors.jsonl") == read_jsonl(tmp_path / "one/errors.jsonl")
    assert len(usage_merged["runs"]) == 4
    assert {r["shard"] for r in usage_merged["runs"]} == {"1/4", "2/4", "3/4", "4/4"}
    assert merge(out).results == 83  # safe to run again


@pytest.mark.xfail(
    strict=True,
    reason="a line without custom_id is numbered base-2, base-3... against the ids its own shard "
    "has read, so an explicit custom_id of that shape (one taken from an earlier output) read by "
    "another shard collides: two results for one id, and the merge drops one (paid, lost). "
    "Fixes: every shard notes every line's id (its seen table N times larger), or an id shaped "
    "line-<hash>-<n> belongs to the shard of line-<hash> (moves such ids between shards mid-job)",
)
async def test_a_custom_id_shaped_like_a_copy_of_an_unnamed_line_merges_as_one_process(
    mock, make_settings, tmp_path: Path
) -> None:
    unnamed = [
        {"model": "test/model", "messages": [{"role": "user", "content": f"again {i}"}]} for i in range(64)
    ]

    def copy_name(body: dict[str, Any]) -> str:
        return stable_id(orjson.dumps(body)) + "-2"

    # Unnamed lines whose derived id and second copy's fall in different shards of 2.
    one, two = [r for r in unnamed if Shard(1, 2).owns(copy_name(r)) != Shard(1, 2).owns(copy_name(r)[:-2])][
        :2
    ]
    named = [
        {"custom_id": copy_name(r), "model": "test/model", "messages": [{"role": "user", "content": "named"}]}
        for r in (one, two)
    ]
    # Named before the copies: one process numbers them base, base-3. Named after: base,
    # base-2, and the named line is an input error (its id is already used).
    src = write_jsonl(tmp_path / "in.jsonl", [named[0], one, one, two, two, named[1]])
    out = tmp_path / "sharded"
    async with mock() as (url, _):
        await pipeline.run(make_settings(url, input=src, output=tmp_path / "one"))
        for k in (1, 2):
            await pipeline.run(make_settings(url, input=src, output=out, shard=f"{k}/2"))
    merged = merge(out)
    assert merged.dropped == {}
    assert sorted(by_id(out / "results.jsonl")) == sorted(by_id(tmp_path / "one/results.jsonl"))
    assert read_jsonl(out / "errors.jsonl") == read_jsonl(tmp_path / "one/errors.jsonl")


def read_jsonl_doc(path: Path) -> dict[str, Any]:
    import orjson

    doc: dict[str, Any] = orjson.loads(path.read_bytes())
    return doc


async def test_a_merge_refuses_missing_or_unfinished_shards_by_name(
    mock, make_settings, tmp_path: Path
) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(40))
    out = tmp_path / "out"
    async with mock() as (url, _):
        for k in (1, 2, 4):
            await pipeline.run(make_settings(url, input=src, output=out, shard=f"{k}/4"))
    with pytest.raises(SettingsError, match="shard 3 of 4 is missing"):
        merge(out)
    # A shard that was killed before it could finish a run:
    (out / "shard-3-of-4").mkdir()
    shutil.copy(out / "shard-2-of-4/ledger.sqlite", out / "shard-3-of-4/ledger.sqlite")
    ledger = Ledger(out / "shard-3-of-4/ledger.sqlite")
    ledger.put("usage", {**ledger.get("usage"), "runs": []})
    ledger.commit()
    ledger.close()
    with pytest.raises(SettingsError, match="shard 3 of 4 has not finished a run") as refused:
        merge(out)
    assert f"run `pipeline run JOB --shard 3/4 --output {out}` again" in str(refused.value)  # the fix
    assert main(["merge", str(out)]) == 2
    assert main(["merge", str(out), "--partial"]) == 0


async def test_a_shard_folder_refuses_another_shard(mock, make_settings, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(10))
    out = tmp_path / "out"
    async with mock() as (url, _):
        await pipeline.run(make_settings(url, input=src, output=out, shard="2/4"))
        shutil.copytree(out / "shard-2-of-4", out / "shard-3-of-5")
        with pytest.raises(SettingsError, match=r"shard was \[2, 4\], now \[3, 5\]"):
            await pipeline.run(make_settings(url, input=src, output=out, shard="3/5"))


async def test_a_killed_shard_resumed_merges_exactly_once(mock, tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "in.jsonl", bodies(1500))
    out = tmp_path / "out"
    # 500 lines a shard at 16 x 40 ms take 1.25 s: the kill lands mid-run, not in the moment
    # after a shard's last record is written (a shard killed then is finished, and merges).
    async with mock(latency=0.04) as (url, _):
        procs = [await start(url, src, out, "--shard", f"{k}/3", "--concurrency", "16") for k in (1, 2, 3)]
        await asyncio.sleep(random.uniform(0.3, 1.0))
        procs[1].send_signal(signal.SIGKILL)
        for proc in procs:
            await proc.communicate()
        assert procs[1].returncode == -signal.SIGKILL
        with pytest.raises(SettingsError, match="shard 2 of 3"):
            merge(out)
        again = await start(url, src, out, "--shard", "2/3", "--concurrency", "16")
        await again.communicate()
        assert again.returncode == 0
    merged = merge(out)
    assert merged.results == 1500
    ids = [r["custom_id"] for r in whole_lines(out / "results.jsonl")]
    assert sorted(ids) == sorted(f"job-{i}" for i in range(1500))  # each once
