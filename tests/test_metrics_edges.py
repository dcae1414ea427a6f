"""`--metrics-port` at its edges: a shard's port past 65535, a shard's lines, a model named "account"."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import anyio
import pytest

import pipeline
from pipeline.account.usage import Usage
from pipeline.errors import SettingsError
from pipeline.input.shard import Shard
from pipeline.run.metrics import RunCollector, serving
from pipeline.settings import build
from tests.conftest import _free_port, bodies
from tests.test_metrics import _scrape, _succeeded


@pytest.mark.parametrize("port", [65536, 70000])
async def test_a_ray_shards_port_past_65535_is_refused_not_wrapped(port: int) -> None:
    # `pipeline ray --metrics-port 65535 --shards 3` gives shard 2 port 65536 (shard.py): on every
    # interface (no --metrics-host) it was served on a random port (65536), or on 70000 - 65536.
    settings = replace(build(input="in.jsonl", metrics_port=65535), metrics_port=port)
    with pytest.raises(SettingsError, match=f"--metrics-port {port}: not a port"):
        async with serving(settings):
            pass


async def test_a_shards_lines_done_are_its_own(mock, make_settings, tmp_path: Path) -> None:
    # Each pod of the README's indexed Job serves its own figures; a dashboard adds them up.
    # Another shard's lines are not done by this one: they are the other pod's to count.
    shard = Shard(1, 2)
    rows: list[dict[str, Any]] = bodies(60)
    rows.sort(key=lambda row: shard.owns(row["custom_id"]))  # (the other shard's lines first)
    others = sum(not shard.owns(row["custom_id"]) for row in rows)
    assert others > 10
    port = _free_port()
    summaries: list[pipeline.Summary] = []
    async with mock(latency=0.02) as (url, _), anyio.create_task_group() as tg:
        settings = make_settings(url, rows, shard="1/2", concurrency=2, metrics_port=port)

        async def go() -> None:
            summaries.append(await pipeline.run(settings))

        tg.start_soon(go)
        while True:
            assert not summaries, "the run ended before it was scraped"
            with contextlib.suppress(aiohttp.ClientConnectionError):
                _, scrape, _ = await _scrape(port)
                if _succeeded(scrape) >= 5:
                    break
            await anyio.sleep(0.01)
    ended = sum(value for (name, _), value in scrape.items() if name == "pipeline_results_total")
    assert scrape["pipeline_lines_done", ()] == ended  # (a fresh folder: the lines ended are the done)


def test_a_model_named_account_keeps_the_accounts_pace_apart() -> None:
    # A model paced on its own is labelled by its name; one named "account" took the
    # account's sample: the account's pace was no longer served.
    account = SimpleNamespace(
        pacer=SimpleNamespace(request_rate=5.0), ceiling=None, limit=8.0, rpm_given=False
    )
    run = SimpleNamespace(
        usage=Usage(),
        control=SimpleNamespace(in_flight=0),
        finder=account,
        gate=SimpleNamespace(scopes=SimpleNamespace(paces=lambda: {"account": (1.0, "found", 2.0)})),
        progress=SimpleNamespace(done=lambda: 0),
        counts=SimpleNamespace(total=None, elsewhere=0),
    )
    paces = sorted(
        sample.value
        for family in RunCollector(run).collect()  # type: ignore[arg-type]
        if family.name == "pipeline_pace_requests_per_second"
        for sample in family.samples
    )
    assert paces == [1.0, 5.0]
