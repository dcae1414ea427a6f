"""The answer cache at the batch tier (issue 23, point 2): a line whose answer the cache holds
is written as reused and never staged; the answers batches bring are kept at the batch price,
which is what a later run says it did not spend; exactly once holds through a kill at every
step, and through a death at the cache's write."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.batch.keep import _line
from pipeline.batch.stage import batch_line
from pipeline.cache.key import request_key
from pipeline.cache.store import AnswerCache
from pipeline.run.runner import run
from pipeline.settings import Settings
from tests.conftest import bodies, read_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeHost, Killed, at_batch_tier

# The fake's answers report 10 prompt and 4 completion tokens, and no cost: the table's.
PRICES = {"test/model": {"prompt": 1.0, "completion": 1.0, "batch_prompt": 0.5, "batch_completion": 0.5}}
BATCH_COST = 14 * 0.5 / 1e6  # an answer, at the batch price
SYNC_COST = 14 * 1.0 / 1e6


def _usage(folder: Path) -> dict[str, Any]:
    return orjson.loads((folder / "usage.json").read_bytes())


def _bodies(folder: Path) -> dict[str, Any]:
    return {r["custom_id"]: r["response"]["body"] for r in read_jsonl(folder / "results.jsonl")}


async def test_a_second_batch_run_stages_nothing_and_says_the_batch_price_not_spent(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    cache = str(tmp_path / "cache")
    first = at_batch_tier(make_settings(server[0], bodies(6), cache=cache, prices=PRICES))
    api = FakeBatchApi(max_lines=4)
    summary = await run(first, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert api.made == 2
    held = AnswerCache(tmp_path / "cache")  # the first run filled it, at the batch price
    assert held.totals()[1] == 6
    held.close()
    paid = _usage(first.folder)["cost"]["total"]
    assert paid == pytest.approx(6 * BATCH_COST)

    again = at_batch_tier(first, output=tmp_path / "again")
    api2 = FakeBatchApi(max_lines=4)
    summary = await run(again, FakeHost(api2))
    assert summary.exit_code == 0, summary.message
    assert api2.made == 0
    assert not api2.ran
    assert summary.succeeded == summary.reused == 6
    results = read_jsonl(again.folder / "results.jsonl")
    assert all(r["reused"] is True for r in results)
    assert _bodies(again.folder) == _bodies(first.folder)
    usage = _usage(again.folder)
    assert usage["reused"]["requests"] == 6
    assert usage["reused"]["cost_not_spent"] == pytest.approx(paid)
    assert usage["cost"]["total"] in (0, None)

    # A synchronous run reusing them says what they cost: the batch price, not its own.
    sync = make_settings(server[0], bodies(6), cache=cache, prices=PRICES, output=tmp_path / "sync")
    summary = await run(sync)
    assert summary.exit_code == 0, summary.message
    assert not server[1].state.received
    assert _usage(sync.folder)["reused"]["cost_not_spent"] == pytest.approx(paid)


async def test_only_the_lines_the_cache_lacks_are_staged(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    cache = str(tmp_path / "cache")
    half = make_settings(server[0], bodies(2), cache=cache, prices=PRICES, output=tmp_path / "sync")
    assert (await run(half)).exit_code == 0  # job-0 and job-1 bought now, at the sync price
    whole = at_batch_tier(
        make_settings(server[0], bodies(4), cache=cache, prices=PRICES, output=tmp_path / "batch")
    )
    api = FakeBatchApi()
    summary = await run(whole, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert sorted(api.ran) == ["job-2", "job-3"]
    results = {r["custom_id"]: r for r in read_jsonl(whole.folder / "results.jsonl")}
    assert sorted(results) == [f"job-{i}" for i in range(4)]
    assert [c for c, r in sorted(results.items()) if r.get("reused")] == ["job-0", "job-1"]
    usage = _usage(whole.folder)
    # (what the synchronous run paid, as usage.json rounds it: to the micro-dollar)
    sync_paid = _usage(half.folder)["cost"]["total"]
    assert usage["reused"]["cost_not_spent"] == pytest.approx(sync_paid, abs=1e-6)
    assert usage["cost"]["total"] == pytest.approx(2 * BATCH_COST)


async def test_then_sync_requests_are_kept_at_the_synchronous_price_and_reused(
    make_settings: Callable[..., Settings], mock: Callable[..., Any], tmp_path: Path
) -> None:
    async with mock(cost=False) as started:  # (no cost told: the table's, at each tier)
        await _then_sync(make_settings, started, tmp_path)


async def _then_sync(make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    api = FakeBatchApi(fate=lambda custom_id, n: "500" if custom_id == "job-1" else "ok")
    settings = at_batch_tier(make_settings(server[0], bodies(3), cache=cache, prices=PRICES), then="sync")
    assert (await run(settings, FakeHost(api))).exit_code == 0
    assert len(server[1].state.received) == 1  # job-1, sent now
    held = AnswerCache(tmp_path / "cache")
    tiers = sorted(row[0] for row in held._writer.execute("SELECT tier FROM answers"))  # type: ignore[union-attr]
    held.close()
    assert tiers == ["batch", "batch", "sync"]
    again = at_batch_tier(settings, output=tmp_path / "again")
    api2 = FakeBatchApi()
    summary = await run(again, FakeHost(api2))
    assert summary.reused == 3
    assert not api2.ran
    assert len(server[1].state.received) == 1
    paid = _usage(settings.folder)["cost"]["total"]  # two at the batch price, one at the sync one
    assert paid > 2 * BATCH_COST
    assert _usage(again.folder)["reused"]["cost_not_spent"] == pytest.approx(paid, abs=1e-6)


def _killed(error: BaseException) -> bool:
    if isinstance(error, Killed):
        return True
    return isinstance(error, BaseExceptionGroup) and any(_killed(e) for e in error.exceptions)


def _fate(custom_id: str, n: int) -> str:
    return "500" if custom_id == "job-1" and n == 1 else "ok"  # job-1 goes again in a new batch


async def test_a_kill_at_every_step_with_a_cache_leaves_every_line_once_and_nothing_paid_twice(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    rows = bodies(3)
    base = at_batch_tier(make_settings(server[0], rows, max_attempts=3, prices=PRICES))
    clean = FakeBatchApi(max_lines=2, fate=_fate)
    assert (await run(at_batch_tier(base, cache=tmp_path / "c0"), FakeHost(clean))).exit_code == 0
    steps = clean.steps
    assert steps > 8
    for k in range(1, steps + 1):
        cache = tmp_path / f"cache-{k}"
        settings = at_batch_tier(base, output=tmp_path / f"out-{k}", cache=cache)
        api = FakeBatchApi(max_lines=2, fate=_fate)
        api.die_at = k
        with pytest.raises(BaseException) as info:  # noqa: PT011 -- a kill, by any path out
            await run(settings, FakeHost(api))
        assert _killed(info.value), info.value
        summary = await run(settings, FakeHost(api))
        where = f"killed at step {k} ({api.step_names[k - 1]})"
        assert summary.exit_code == 0, (where, summary.message)
        ids = [r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl")]
        assert sorted(ids) == ["job-0", "job-1", "job-2"], where
        assert api.ran == {"job-0": 1, "job-1": 2, "job-2": 1}, where
        # What the cache kept is what the folder holds: another folder reuses it, and buys
        # only what it lacks (nothing, as no process died for real between the two writes).
        third = at_batch_tier(settings, output=tmp_path / f"more-{k}")
        api3 = FakeBatchApi(max_lines=2)
        assert (await run(third, FakeHost(api3))).exit_code == 0, where
        assert _bodies(third.folder) == _bodies(settings.folder), where
        assert not api3.ran, where


async def test_a_death_at_the_caches_write_loses_and_doubles_nothing(
    make_settings: Callable[..., Settings],
    server: tuple[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The process dies as the cache is written, after the batch's answers are committed: as
    # kill -9 there would, nothing queued reaches the file.
    def die(self: AnswerCache) -> None:
        self._queue.clear()
        raise Killed("the cache's write")

    settings = at_batch_tier(
        make_settings(server[0], bodies(4), cache=str(tmp_path / "cache"), prices=PRICES)
    )
    with monkeypatch.context() as patched:
        patched.setattr(AnswerCache, "flush", die)
        with pytest.raises(BaseException) as info:  # noqa: PT011 -- a kill, by any path out
            await run(settings, FakeHost(FakeBatchApi()))
        assert _killed(info.value), info.value
    api = FakeBatchApi()
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert not api.ran  # every line was done: nothing staged again
    ids = sorted(r["custom_id"] for r in read_jsonl(settings.folder / "results.jsonl"))
    assert ids == [f"job-{i}" for i in range(4)]
    # The answers never reached the cache: another folder buys them, once.
    other = at_batch_tier(settings, output=tmp_path / "other")
    api2 = FakeBatchApi()
    assert (await run(other, FakeHost(api2))).exit_code == 0
    assert sorted(api2.ran) == ids
    assert set(api2.ran.values()) == {1}


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)


@hypothesis.settings(max_examples=100)
@given(
    custom_id=st.text(max_size=40) | st.just(',"method":"POST","url":"/v1/chat/completions","body":{}}'),
    body=st.dictionaries(st.text(max_size=8), _JSON, max_size=4),
)
def test_a_staged_line_gives_back_its_id_and_the_key_of_its_payload(
    custom_id: str, body: dict[str, Any]
) -> None:
    # The key an answer is kept under at intake is the one a later run looks the line up by.
    payload = orjson.dumps({"model": "m", **body})
    assert _line(batch_line(custom_id, payload)) == (custom_id, payload)
    assert request_key(orjson.dumps(orjson.loads(payload))) == request_key(payload)


async def test_a_line_with_a_local_image_whose_answer_is_kept_is_reused_where_batches_take_no_image(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    # OpenRouter's inline batches take no image: such a line fails unsent, unless the cache
    # holds its answer (bought by a synchronous run), which it takes, as the estimate says.
    from pipeline.estimate import estimate
    from tests.conftest import write_jsonl
    from tests.test_images import job, jpeg

    (tmp_path / "a.jpg").write_bytes(jpeg(64, 48))
    (tmp_path / "b.jpg").write_bytes(jpeg(48, 64))
    rows = [{"asset_id": "a", "image_path": "a.jpg"}, {"asset_id": "b", "image_path": "b.jpg"}]
    cache = str(tmp_path / "cache")
    sync = make_settings(
        server[0], job=job(tmp_path), input=write_jsonl(tmp_path / "one.jsonl", rows[:1]), cache=cache
    )
    assert (await run(sync)).exit_code == 0
    both = at_batch_tier(
        make_settings(
            server[0],
            job=job(tmp_path),
            input=write_jsonl(tmp_path / "two.jsonl", rows),
            cache=cache,
            output=tmp_path / "batch",
        )
    )
    cached = estimate(both).cached
    assert cached is not None
    assert cached.hits == 1
    api = FakeBatchApi()
    api.shape = "inline"
    summary = await run(both, FakeHost(api))
    assert not api.ran
    assert summary.reused == 1
    assert [r["custom_id"] for r in read_jsonl(both.folder / "results.jsonl")] == ["a"]
    assert [e["error"]["code"] for e in read_jsonl(both.folder / "errors.jsonl")] == ["images_not_batched"]


async def test_a_repair_counts_a_reused_line_at_what_it_cost_when_bought(
    make_settings: Callable[..., Settings], mock: Callable[..., Any], tmp_path: Path
) -> None:
    # Bought by a synchronous run, reused by a batch run that is then killed before its
    # index holds them: the repair read them back at the batch run's (batch) prices, half.
    import time

    from pipeline.output.folder import LEDGER
    from pipeline.output.ledger import OPEN_RUN, Ledger
    from pipeline.output.repair import open_run_mark

    async with mock(cost=False) as (url, _):  # (no cost told: the table's, at each tier)
        cache = str(tmp_path / "cache")
        sync = make_settings(url, bodies(2), prices=PRICES, cache=cache, output=tmp_path / "sync")
        paid = (await run(sync)).usage["cost"]["total"]
        assert paid > 0
        batch = at_batch_tier(make_settings(url, bodies(2), prices=PRICES, cache=cache))
        assert (await run(batch, FakeHost(FakeBatchApi()))).reused == 2
        ledger = Ledger(batch.folder / LEDGER)  # as a kill leaves it: open, its index rebuilt
        ledger.put(OPEN_RUN, open_run_mark(time.time(), {}))
        ledger.put("results_offset", 0)
        ledger.close(commit=True)
        summary = await run(batch, FakeHost(FakeBatchApi()))
    assert summary.exit_code == 0, summary.message
    assert summary.usage["reused"]["cost_not_spent"] == pytest.approx(paid, abs=1e-6)
    costs = [r["cost_not_spent"] for r in read_jsonl(batch.folder / "results.jsonl")]
    assert sum(costs) == pytest.approx(paid, abs=1e-6)
