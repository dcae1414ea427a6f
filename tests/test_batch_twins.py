"""Twins at the batch tier (issue 23, point 2): with `--cache`, of the lines of one run whose
request is the same, one is staged (the leader) and the others are answered with its answer,
as reused; where the leader fails or its batch expires, the twins are still answered, once
each; a kill at any step loses and doubles nothing."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hypothesis
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.batch import twins
from pipeline.run.runner import run
from pipeline.send.status import http_error
from pipeline.settings import Settings
from tests.conftest import read_jsonl, write_jsonl
from tests.fakebatchapi import FakeBatchApi, FakeHost, Killed, at_batch_tier

PRICES = {"test/model": {"prompt": 1.0, "completion": 1.0, "batch_prompt": 0.5, "batch_completion": 0.5}}
BATCH_COST = 14 * 0.5 / 1e6  # an answer of the fake's, at the batch price


def _rows(keys: list[int]) -> list[dict[str, Any]]:
    """A line a key: lines of the same key ask the same."""
    return [
        {"custom_id": f"job-{i}", "model": "test/model", "messages": [{"role": "user", "content": f"q {k}"}]}
        for i, k in enumerate(keys)
    ]


def _ended(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    results = read_jsonl(folder / "results.jsonl")
    errors = read_jsonl(folder / "errors.jsonl") if (folder / "errors.jsonl").exists() else []
    ids = Counter([r["custom_id"] for r in results] + [e["custom_id"] for e in errors])
    assert all(n == 1 for n in ids.values()), ids
    return {r["custom_id"]: r for r in results}, {e["custom_id"]: e for e in errors}


async def test_fifty_lines_of_five_requests_are_staged_five_and_paid_five(
    make_settings: Callable[..., Settings],
    server: tuple[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(twins, "PRUNE_AT", 2)  # (the leaders of batches taken in let go, often)
    rows = _rows([i % 5 for i in range(50)])
    settings = at_batch_tier(make_settings(server[0], rows, cache=str(tmp_path / "c"), prices=PRICES))
    api = FakeBatchApi(max_lines=4)
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert sorted(api.ran) == [f"job-{i}" for i in range(5)]  # the leaders, once each
    assert sum(api.ran.values()) == 5
    results, errors = _ended(settings.folder)
    assert sorted(results) == sorted(r["custom_id"] for r in rows)
    assert not errors
    for i in range(50):  # each answered with its leader's answer
        body = results[f"job-{i}"]["response"]["body"]
        assert body["choices"][0]["message"]["content"] == f"answer to job-{i % 5}"
        assert bool(results[f"job-{i}"].get("reused")) == (i >= 5)
    assert summary.reused == 45
    usage = orjson.loads((settings.folder / "usage.json").read_bytes())
    assert usage["cost"]["total"] == pytest.approx(5 * BATCH_COST)
    assert usage["reused"]["requests"] == 45
    assert usage["reused"]["cost_not_spent"] == pytest.approx(45 * BATCH_COST)
    # (the answers brought, and the tries that brought them: a reused one made none)
    assert usage["answers_by_status"] == {"200": 5}
    assert usage["attempts"] == 5


@pytest.mark.parametrize(
    ("leader", "ran"),
    [
        (["expired", "ok"], {"job-0": 2}),  # its batch expired: it goes again, the twins with it
        (["500", "ok"], {"job-0": 2}),  # a server error: again
        (["500", "500"], {"job-0": 2, "job-1": 1, "job-2": 1, "job-3": 1}),  # no tries left: each goes
        (["400"], {"job-0": 1, "job-1": 1, "job-2": 1, "job-3": 1}),  # refused: each goes itself
    ],
)
async def test_a_leader_that_fails_leaves_its_twins_answered_once(
    make_settings: Callable[..., Settings],
    server: tuple[str, Any],
    tmp_path: Path,
    leader: list[str],
    ran: dict[str, int],
) -> None:
    rows = _rows([0, 0, 0, 0, 1])

    def fate(custom_id: str, n: int) -> str:
        if custom_id == "job-0":
            return leader[min(n, len(leader)) - 1]
        return "ok"

    settings = at_batch_tier(
        make_settings(server[0], rows, cache=str(tmp_path / "c"), prices=PRICES, max_attempts=2)
    )
    api = FakeBatchApi(max_lines=10, fate=fate)
    await run(settings, FakeHost(api))
    first = next(iter(api.batches.values()))
    assert [custom_id for custom_id, _ in first.lines] == ["job-0", "job-4"]  # the twins wait
    results, errors = _ended(settings.folder)
    assert sorted([*results, *errors]) == [f"job-{i}" for i in range(5)]
    assert dict(api.ran) == {**ran, "job-4": 1}
    if leader[-1] == "ok":
        assert not errors
        assert [c for c, r in sorted(results.items()) if r.get("reused")] == ["job-1", "job-2", "job-3"]
    else:
        assert "job-0" in errors


class _Refusing(FakeBatchApi):
    """A provider that refuses the first batch made (a 400 at its creation)."""

    async def submit(self, staged: Path, *, tag: str, model: str, lines: int) -> Any:
        if not self.made:
            self.made = -1
            raise http_error(400, "the batch is refused")
        return await super().submit(staged, tag=tag, model=model, lines=lines)


async def test_a_batch_refused_fails_its_twins_with_its_lines_once(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    rows = _rows([0, 1, 0, 1])
    settings = at_batch_tier(make_settings(server[0], rows, cache=str(tmp_path / "c"), prices=PRICES))
    api = _Refusing(max_lines=10)
    await run(settings, FakeHost(api))
    results, errors = _ended(settings.folder)
    assert not results
    assert sorted(errors) == [f"job-{i}" for i in range(4)]  # the twins with their leaders
    assert all("refused" in e["error"]["message"] for e in errors.values())
    assert not api.ran

    # Sent again by the next run (failed unsent), the twins wait for their leaders again.
    again = _Refusing(max_lines=10)
    again.made = -1  # (this one refuses nothing)
    summary = await run(settings, FakeHost(again))
    assert summary.exit_code == 0, summary.message
    results, errors = _ended(settings.folder)
    assert sorted(results) == [f"job-{i}" for i in range(4)]
    assert dict(again.ran) == {"job-0": 1, "job-1": 1}


def _killed(error: BaseException) -> bool:
    if isinstance(error, Killed):
        return True
    return isinstance(error, BaseExceptionGroup) and any(_killed(e) for e in error.exceptions)


def _fate(custom_id: str, n: int) -> str:
    return "500" if custom_id == "job-0" and n == 1 else "ok"  # the leader of key 0 goes again


@pytest.mark.parametrize("keys", [[0, 1, 0, 1, 2], [0, 1, 2, 0, 1]])
async def test_a_kill_at_every_step_with_twins_leaves_every_line_once_and_nothing_paid_twice(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path, keys: list[int]
) -> None:
    rows = _rows(keys)  # two pairs of twins; [0, 1, 2, 0, 1]: a batch cut before the twins are read
    led = {f"job-{keys.index(k)}" for k in set(keys)}
    twinned = sorted({r["custom_id"] for r in rows} - led)
    base = at_batch_tier(make_settings(server[0], rows, max_attempts=3, prices=PRICES))
    clean = FakeBatchApi(max_lines=2, fate=_fate)
    assert (await run(at_batch_tier(base, cache=tmp_path / "c0"), FakeHost(clean))).exit_code == 0
    assert sorted(clean.ran) == sorted(led)
    steps = clean.steps
    for k in range(1, steps + 1):
        settings = at_batch_tier(base, output=tmp_path / f"out-{k}", cache=tmp_path / f"cache-{k}")
        api = FakeBatchApi(max_lines=2, fate=_fate)
        api.die_at = k
        with pytest.raises(BaseException) as info:  # noqa: PT011 -- a kill, by any path out
            await run(settings, FakeHost(api))
        assert _killed(info.value), info.value
        summary = await run(settings, FakeHost(api))
        where = f"killed at step {k} ({api.step_names[k - 1]})"
        assert summary.exit_code == 0, (where, summary.message)
        results, _ = _ended(settings.folder)
        assert sorted(results) == [f"job-{i}" for i in range(5)], where
        # Nothing run twice but job-0 (its fate: again), and no twin run: one read by the
        # second run waits for its leader in the first run's batch. (A kill between a
        # leader's answer written and the batch taken: the test after this one.)
        assert {c: api.ran[c] for c in led} == {c: clean.ran[c] for c in led}, where
        assert not any(api.ran[c] for c in twinned), where


@hypothesis.settings(
    max_examples=15, deadline=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture]
)
@given(
    keys=st.lists(st.integers(0, 3), min_size=1, max_size=12),
    fates=st.lists(st.sampled_from(["ok", "500", "400", "expired", "missing"]), min_size=4, max_size=4),
    now=st.booleans(),
)
async def test_every_line_of_any_keys_and_leader_fates_ends_once(
    make_settings: Callable[..., Settings],
    server: tuple[str, Any],
    tmp_path_factory: pytest.TempPathFactory,
    keys: list[int],
    fates: list[str],
    now: bool,
) -> None:
    folder = tmp_path_factory.mktemp("twins")
    rows = _rows(keys)

    def fate(custom_id: str, n: int) -> str:
        key = keys[int(custom_id.removeprefix("job-"))]
        return fates[key] if n == 1 else "ok"  # a line's first batch: its key's fate

    extra = {"then": "sync"} if now else {}
    settings = at_batch_tier(
        make_settings(
            server[0],
            rows,
            cache=str(folder / "c"),
            prices=PRICES,
            max_attempts=2,
            output=folder / "out",
            input=write_jsonl(folder / "in.jsonl", rows),
        ),
        **extra,
    )
    api = FakeBatchApi(max_lines=3, fate=fate)
    host = FakeHost(api)
    host.batch_clock.held = host.staging  # (batches end once the input is staged, as in a day)
    await run(settings, host)
    results, errors = _ended(settings.folder)
    assert sorted([*results, *errors]) == sorted(r["custom_id"] for r in rows)
    for custom_id, error in errors.items():  # only what its own key's fate failed
        assert fates[keys[int(custom_id.removeprefix("job-"))]] == "400", error
    # A key is run in batches by one of its lines, unless that one is refused (400): then
    # each of its twins goes itself, as the synchronous tier sends a failing key's waiters.
    for key in set(keys):
        run_by = {custom_id for custom_id in api.ran if keys[int(custom_id.removeprefix("job-"))] == key}
        assert len(run_by) == 1 or fates[key] == "400", (key, run_by)


async def test_a_redo_at_the_batch_tier_sends_its_lines_though_the_cache_or_a_twin_has_their_answer(
    make_settings: Callable[..., Settings], server: tuple[str, Any], tmp_path: Path
) -> None:
    rows = _rows([0, 0, 0, 1])
    cache = str(tmp_path / "c")
    settings = at_batch_tier(make_settings(server[0], rows, cache=cache, prices=PRICES))
    assert (await run(settings, FakeHost(FakeBatchApi(max_lines=10)))).exit_code == 0
    ids = tmp_path / "ids.txt"
    ids.write_text("job-1\njob-2\njob-3\n")  # two twins and a leader: new answers asked for
    api = FakeBatchApi(max_lines=10)
    redo = at_batch_tier(
        make_settings(server[0], cache=cache, prices=PRICES, redo=f"ids:{ids}", input=settings.input)
    )
    summary = await run(redo, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert dict(api.ran) == {"job-1": 1, "job-2": 1, "job-3": 1}  # (each sent: none the cache's)
    results, _ = _ended(settings.folder)
    assert [c for c, r in sorted(results.items()) if r.get("reused")] == []
    # The new answer replaced the kept one: a later run into another folder takes it.
    later = at_batch_tier(
        make_settings(server[0], _rows([0]), cache=cache, prices=PRICES, output=tmp_path / "later")
    )
    assert (await run(later, FakeHost(FakeBatchApi()))).reused == 1
    (answer,) = read_jsonl(tmp_path / "later" / "results.jsonl")
    assert answer["response"]["body"]["choices"][0]["message"]["content"] in (
        "answer to job-1",
        "answer to job-2",
    )


@pytest.mark.parametrize("cache", ["other", None])
async def test_twins_of_a_leader_written_before_a_kill_take_its_answer_from_the_batch_not_a_new_one(
    make_settings: Callable[..., Settings],
    server: tuple[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    cache: str | None,
) -> None:
    from pipeline.batch.intake import Intake
    from pipeline.batch.paired import Paired

    intakes: list[Intake] = []
    made = Intake.__init__

    def keeping(self: Intake, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        intakes.append(self)

    async def killed(self: Paired, *args: Any) -> Any:
        # The leader's answer written and committed done (the writer's checkpoint runs on its
        # own as a long batch is read), then SIGKILL: the answers the cache had queued, lost.
        await intakes[-1].writer.checkpoint()
        raise Killed

    monkeypatch.setattr(Intake, "__init__", keeping)
    monkeypatch.setattr(Paired, "answer", killed)
    rows = _rows([0, 0, 0, 1])
    settings = at_batch_tier(make_settings(server[0], rows, cache=str(tmp_path / "c"), prices=PRICES))
    api = FakeBatchApi(max_lines=10)
    with pytest.raises(BaseException) as info:  # noqa: PT011 -- a kill, by any path out
        await run(settings, FakeHost(api))
    assert _killed(info.value), info.value
    monkeypatch.undo()
    resumed = at_batch_tier(settings, cache=None if cache is None else tmp_path / cache)
    summary = await run(resumed, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    assert dict(api.ran) == {"job-0": 1, "job-3": 1}  # (the twins: not paid for)
    results, errors = _ended(settings.folder)
    assert not errors
    assert [c for c, r in sorted(results.items()) if r.get("reused")] == ["job-1", "job-2"]
    assert results["job-2"]["response"]["body"]["choices"][0]["message"]["content"] == "answer to job-0"
