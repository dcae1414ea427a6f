"""A pace per scope: one model limited on its own, others not, on one key (issue 21, point 1)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis.asyncio as redis
from aiohttp import web

from pipeline.mock.limits import Window
from pipeline.run.runner import run
from tests.conftest import RedisServer, read_jsonl, write_jsonl
from tests.scripted import answer, json, scripted
from tests.test_crash import start

FREE, PAID = "v/free:free", "v/paid"


class TwoModels:
    """A server that allows FREE `per_second` requests a wall-clock second (as the mock's
    limits count by default) and PAID as many as come, each answered after `latency`."""

    def __init__(self, per_second: int, latency: float, *, limited: tuple[str, ...] = (FREE,)) -> None:
        self.window = Window(length=1.0, requests=per_second, tokens=None)
        self.limited = limited  # the models the window counts (both: the account's limit)
        self.latency = latency
        self.answered: dict[str, list[float]] = {FREE: [], PAID: []}
        self.refused: Counter[str] = Counter()

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        model = body["model"]
        if model in self.limited:
            refusal = self.window.admit(time.time(), 0)
            if refusal is not None:
                self.refused[model] += 1
                # No Retry-After: the wait is the tool's to choose (as OpenRouter's free tier).
                return json({"error": {"message": refusal.message, "code": 429}}, status=429)
        await asyncio.sleep(self.latency)
        self.answered[model].append(time.monotonic())
        return answer(body)


def lines(free: int, paid: int) -> list[dict[str, Any]]:
    """Both models' lines, mixed through the file as a job's would be."""
    step = (free + paid) // free
    models = [FREE if i % step == 0 and i // step < free else PAID for i in range(free + paid)]
    return [
        {"custom_id": f"r{i}", "model": model, "messages": [{"role": "user", "content": f"q{i}"}]}
        for i, model in enumerate(models)
    ]


async def _run(
    server: TwoModels, make_settings: Any, tmp_path: Path, rows: list[dict[str, Any]], **kw: Any
) -> Any:
    async with scripted(server) as endpoint:
        settings = make_settings(endpoint.url, rows, concurrency=64, quiet=False, **kw)
        summary = await run(settings)
    assert summary.exit_code == 0
    results = read_jsonl(tmp_path / "out" / "results.jsonl")
    assert sorted(r["custom_id"] for r in results) == sorted(r["custom_id"] for r in rows)  # each once
    return orjson.loads((tmp_path / "out" / "usage.json").read_bytes())


def _paces(usage: dict[str, Any], model: str) -> list[tuple[float, str]]:
    return [
        (p["scopes"][model]["pace"], p["scopes"][model]["pace_kind"])
        for stretch in usage["timeline"]
        for p in stretch["points"]
        if model in p.get("scopes", {})
    ]


async def test_a_model_refused_while_others_go_through_gets_a_pace_of_its_own(
    make_settings: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = TwoModels(per_second=10, latency=0.05)
    rows = lines(free=40, paid=400)
    usage = await _run(server, make_settings, tmp_path, rows, progress_interval=1.0)
    # The paid model's lines are not held to the free model's limit: all done while most of
    # the free model's were still to go (at its 10 a second they take four seconds; held
    # to it, the paid model's would take forty).
    free_done = server.answered[FREE]
    assert max(server.answered[PAID]) < free_done[len(free_done) // 2]
    # The free model's limit is found, from its own refusals, and shown.
    paces = _paces(usage, FREE)
    assert paces
    assert {kind for _, kind in paces} == {"found"}
    # (A first reading may span two of the server's seconds, and read up to twice the limit,
    # until the next refusals correct it: a few more 429s, not the pace of the run.)
    assert 5.0 <= paces[-1][0] <= 20.0
    assert len(free_done) / (free_done[-1] - free_done[0]) >= 7.0  # 40 lines at 10 a second
    said = capsys.readouterr().err
    assert said.count(f"'{FREE}' is refused while other models' requests go through") == 1
    assert re.search(f"pace [0-9,]+/min \\(found\\) for '{re.escape(FREE)}'; account unpaced", said)
    page = (tmp_path / "out" / "report.html").read_text()
    charts = [base64.b64decode(src).decode() for src in re.findall(r"base64,([^\"]*)", page)]
    assert any(f"pace for {FREE}" in chart for chart in charts)  # drawn beside the account's
    # Found at a few refusals' cost, and the account's pace not cut for them.
    assert server.refused[FREE] <= 20
    assert usage["runs"][-1]["models_paced_at_rpm"][FREE] <= 600
    assert "paced_at_rpm" not in usage["runs"][-1]


async def test_a_models_limit_given_in_the_job_file_paces_it_from_the_start(
    make_settings: Any, tmp_path: Path
) -> None:
    server = TwoModels(per_second=10, latency=0.05)
    rows = lines(free=30, paid=300)
    job = tmp_path / "job.toml"
    job.write_text(f'[limits."{FREE}"]\nrpm = 600\n')
    usage = await _run(server, make_settings, tmp_path, rows, job=job)
    assert server.refused[FREE] <= 2  # paced at 98 % of 10 a second from its first request
    free_done = server.answered[FREE]
    assert max(server.answered[PAID]) < free_done[len(free_done) // 2]
    assert {kind for _, kind in _paces(usage, FREE)} == {"given"}


async def test_shards_share_a_models_limit_under_a_key_of_its_own(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    server = TwoModels(per_second=20, latency=0.02)
    src = write_jsonl(tmp_path / "in.jsonl", lines(free=40, paid=80))
    job = tmp_path / "job.toml"
    job.write_text(f'[limits."{FREE}"]\nrpm = 1200\n')
    out = tmp_path / "out"
    async with scripted(server) as endpoint:
        procs = [
            await start(
                endpoint.url, src, out, str(job), "--shard", f"{k}/2", "--shared-limit", redis_server.url
            )
            for k in (1, 2)
        ]
        said = [await proc.communicate() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], [err[-300:] for _, err in said]
    assert len(server.answered[FREE]) == 40
    assert sum(len(read_jsonl(out / f"shard-{k}-of-2/results.jsonl")) for k in (1, 2)) == 120
    # (A few refusals as the run starts: the account's shared pace, not yet known, holds the
    # model's first starts back until its first lease, then lets them go together.)
    assert server.refused[FREE] <= 12
    client: Any = redis.Redis.from_url(redis_server.url)
    try:
        keys = [k.decode() for k in await client.keys("*")]
    finally:
        await client.aclose()
    digest = hashlib.sha256(FREE.encode()).hexdigest()[:16]
    assert any(f":{digest}" in key for key in keys)  # the model's scope: a key of its own...
    assert not any("free" in key for key in keys)  # ...named by a hash


async def test_a_model_waiting_for_its_pace_holds_up_no_other_models_lines(
    make_settings: Any, tmp_path: Path
) -> None:
    """The slow model's lines come first, more than there are workers: each worker would
    take one and wait for its pace, and the other model's lines behind them as long."""
    server = TwoModels(per_second=10, latency=0.02)
    rows = lines(free=24, paid=24)
    rows.sort(key=lambda row: row["model"] != FREE)  # the free model's 24 lines first
    rows += [{**row, "custom_id": f"p{i}"} for i, row in enumerate(lines(free=1, paid=137)[1:])]
    job = tmp_path / "job.toml"
    job.write_text(f'[limits."{FREE}"]\nrpm = 600\n')
    async with scripted(server) as endpoint:
        summary = await run(make_settings(endpoint.url, rows, concurrency=8, job=job))
    assert summary.exit_code == 0
    free_done = server.answered[FREE]
    assert len(free_done) == 24
    assert max(server.answered[PAID]) < free_done[10]  # 160 paid lines while 10 free ones go


async def test_an_account_limit_met_by_two_models_stays_the_accounts(
    make_settings: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = TwoModels(per_second=40, latency=0.02, limited=(FREE, PAID))
    usage = await _run(server, make_settings, tmp_path, lines(free=40, paid=120))
    assert "is refused while other models" not in capsys.readouterr().err  # no model to blame
    assert "models_paced_at_rpm" not in usage["runs"][-1]
    assert 0.5 * 40 * 60 <= usage["runs"][-1]["paced_at_rpm"] <= 40 * 60  # found for the account
    # (Finding it costs 4 to 8 refusals most runs, and about 35 once in a few, as before
    # scopes; unpaced, most of what goes past 40 a second would be.)
    assert sum(server.refused.values()) <= 64, server.refused
