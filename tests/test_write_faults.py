"""Every place pipeline writes, made to fail in turn (tests/inject.py finds the places), and the
same command run again: every input line ends exactly once, and no answer is bought twice
unless it arrived but could not be written.

A scenario is a folder made ready (`prepare`, faults off) and a command (`command`, the one a
fault hits, then run again cleanly until it finishes). Adding one is adding a Scenario."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiohttp import web

import pipeline
from pipeline.cli import _merge
from pipeline.errors import RunStopped, SettingsError
from pipeline.input.reader import stable_id
from pipeline.mock.server import MockConfig, MockServer
from pipeline.output import appendfile
from pipeline.output import writer as writer_module
from pipeline.output.folder import write_lines
from pipeline.output.ledger import Ledger
from pipeline.report import markdown as markdown_module
from pipeline.settings import Settings, build
from tests.conftest import FAKE_KEY
from tests.inject import INJECTOR, Site, cancelling, faults, installed

SITES_AT_LEAST = 150  # a recorder that finds too few is broken, not lucky
CANCELLED = -1  # the command's caller cancelled it

# -- the endpoint: the mock, which lines fail for good, and what each run asked for ------------


class Endpoint:
    def __init__(self) -> None:
        self.mock = MockServer(MockConfig())
        self.refuse: set[str] = set()  # tags answered 400, a failure that is final
        self.runs: list[tuple[str, Counter[str], Counter[str]]] = []  # (label, asked, answered)

    def begin(self, label: str) -> None:
        self.runs.append((label, Counter(), Counter()))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        tag = body["messages"][0]["content"].split()[-1]
        _, asked, answered = self.runs[-1]
        asked[tag] += 1
        if tag in self.refuse:
            return web.json_response({"error": {"message": "refused for good", "code": 400}}, status=400)
        response = await self.mock.chat(request)
        if response.status == 200:
            answered[tag] += 1
        return response

    async def models(self, request: web.Request) -> web.Response:
        return await self.mock.models(request)


@dataclass(frozen=True)
class Line:
    raw: bytes
    tag: str | None  # what the endpoint sees; None for a line never sent
    key: str  # the id it ends under: custom_id, or line:N for a bad line
    ends: str  # "result" or "error"


def line(tag: str, *, custom_id: str | None = None, ends: str = "result") -> Line:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": f"q {tag}"}]}
    if custom_id is not None:
        body = {"custom_id": custom_id, **body}
    raw = orjson.dumps(body)
    return Line(raw, tag, custom_id if custom_id is not None else stable_id(raw), ends)


def job_lines(count: int) -> list[Line]:
    """Good lines, lines the endpoint refuses for good, a line that is not JSON, a duplicate
    id, and lines without an id."""
    lines: list[Line] = []
    for i in range(count):
        n = len(lines) + 1
        if i % 9 == 4:  # not JSON
            lines.append(Line(b'{"custom_id": "bad-%d", "mess' % i, None, f"line:{n}", "error"))
        elif i % 9 == 7:  # id-0's again: the later line is the bad one
            lines.append(Line(line(f"dup-{i}", custom_id="id-0").raw, None, f"line:{n}", "error"))
        elif i % 11 == 5:
            lines.append(line(f"anon-{i}"))
        elif i % 7 == 3:
            lines.append(line(f"no-{i}", custom_id=f"id-{i}", ends="error"))
        else:
            lines.append(line(f"id-{i}", custom_id=f"id-{i}"))
    return lines


# -- the world a scenario runs in ------------------------------------------------------------------


@dataclass
class World:
    root: Path  # this instance's folder
    input: Path  # shared by every instance of a scenario (the job's fingerprint names it)
    url: str
    endpoint: Endpoint
    lines: list[Line]

    @property
    def out(self) -> Path:
        return self.root / "out"

    def settings(self, **overrides: Any) -> Settings:
        overrides.setdefault("output", self.out)
        return build(
            None,
            base_url=self.url,
            input=self.input,
            concurrency=3,
            quiet=True,
            backoff_base=0.0,
            backoff_max=0.0,
            timeout=5.0,
            grace=5.0,
            **overrides,
        )

    def write_input(self, lines: list[Line]) -> None:
        self.input.write_bytes(b"".join(x.raw + b"\n" for x in lines))


async def run_command(world: World, **overrides: Any) -> tuple[int, str]:
    """`pipeline run` in process, its exceptions mapped to exit statuses as the CLI does."""
    try:
        summary = await pipeline.run(world.settings(**overrides))
    except RunStopped as e:
        return 3, str(e)
    except SettingsError as e:
        return 2, str(e)
    return summary.exit_code, summary.message


@dataclass(frozen=True)
class Scenario:
    name: str
    prepare: Callable[[World], Awaitable[None]]
    command: Callable[[World], Awaitable[tuple[int, str]]]
    final: Callable[[World], Path]  # the folder whose files must hold every line once
    lines: int = 20
    again: bool = False  # the command asks for everything again (--fresh): nothing to hold it to
    new_sites_only: bool = False  # fail only the sites the scenarios before it did not reach
    redo: bool = False  # the command asks again for lines results.jsonl holds (--redo)


async def prepare_fresh(world: World) -> None:
    world.write_input(world.lines)


async def prepare_resume(world: World) -> None:
    """A folder an earlier run left: results, failures the rerun retries, bad lines; then a
    crash: the index behind the file by two lines, a copy of a line, a torn last line."""
    first = world.lines[: len(world.lines) * 2 // 3]
    world.write_input(first)
    world.endpoint.refuse |= {x.tag for x in first[5:9] if x.tag}  # these succeed on the next run
    world.endpoint.begin("prepare")
    code, message = await run_command(world)
    assert code == 1, message
    world.endpoint.refuse = {x.tag for x in world.lines if x.tag and x.tag.startswith("no-")}
    results = world.out / "results.jsonl"
    data = results.read_bytes()
    kept = data.splitlines(keepends=True)
    behind = kept[-2:]
    ledger = Ledger(world.out / "ledger.sqlite")
    for raw in behind:
        ledger._db.execute("DELETE FROM done WHERE id = ?", (orjson.loads(raw)["custom_id"],))
    ledger.put("results_offset", len(data) - sum(map(len, behind)))
    ledger.commit()
    ledger.close()
    results.write_bytes(data + kept[0] + kept[-1][:50])
    world.write_input(world.lines)


async def prepare_done(world: World) -> None:
    world.write_input(world.lines)
    world.endpoint.begin("prepare")
    code, message = await run_command(world)
    assert code == 1, message


async def fresh_command(world: World) -> tuple[int, str]:
    return await run_command(world, fresh=True)


async def prepare_shards(world: World) -> None:
    world.write_input(world.lines)
    world.endpoint.begin("prepare")
    for k in (1, 2):
        code, message = await run_command(world, shard=f"{k}/2")
        assert code in (0, 1), message


async def merge_command(world: World) -> tuple[int, str]:
    """`pipeline merge OUT`, as the CLI runs it (its exit status and what it says)."""
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        code = _merge(world.out, partial=False)
    return code, said.getvalue()


async def prepare_redo(world: World) -> None:
    """A folder whose answers were cut short (max_tokens 20: most of the mock's)."""
    world.write_input(world.lines)
    world.endpoint.begin("prepare")
    code, message = await run_command(world, request={"max_tokens": 20})
    assert code == 1, message


async def redo_command(world: World) -> tuple[int, str]:
    return await run_command(world, request={"max_tokens": 60}, redo="length")


def cut_short(result: dict[str, Any]) -> bool:
    return any(c.get("finish_reason") == "length" for c in result["response"]["body"]["choices"])


def superseded_once(world: World, template: Path) -> list[str]:
    """A redo's end: each answer cut short before is in superseded.jsonl once, as it stood,
    and results.jsonl holds its new answer."""
    before = (template / "out/results.jsonl").read_bytes().splitlines(keepends=True)
    cut = sorted(raw for raw in before if cut_short(orjson.loads(raw)))
    path = world.out / "superseded.jsonl"
    moved = sorted(path.read_bytes().splitlines(keepends=True)) if path.exists() else []
    problems = (
        [] if moved == cut else [f"superseded.jsonl holds {len(moved)} lines, not the {len(cut)} replaced"]
    )
    still = sorted(r["custom_id"] for r in whole(world.out / "results.jsonl") if cut_short(r))
    return problems + ([f"results.jsonl still holds the old answers of {still}"] if still else [])


SCENARIOS = [
    Scenario("fresh", prepare_fresh, run_command, lambda w: w.out),
    Scenario("resume", prepare_resume, run_command, lambda w: w.out),
    # Moving the old files aside, then a run like the fresh one: only the moving is new.
    Scenario("--fresh", prepare_done, fresh_command, lambda w: w.out, again=True, new_sites_only=True),
    Scenario("merge", prepare_shards, merge_command, lambda w: w.out),
    # Lines chosen, sent again, their older answers moved out: only the redo's own writes.
    Scenario("--redo", prepare_redo, redo_command, lambda w: w.out, lines=10, redo=True, new_sites_only=True),
]

# -- what must hold ------------------------------------------------------------------------------


def whole(path: Path) -> list[dict[str, Any]]:
    """The file's whole, readable lines (a torn or garbled one is the next run's to repair)."""
    if not path.exists():
        return []
    found = []
    for raw in path.read_bytes().splitlines(keepends=True):
        if raw.endswith(b"\n"):
            with contextlib.suppress(orjson.JSONDecodeError):
                found.append(orjson.loads(raw))
    return found


def error_key(record: dict[str, Any]) -> str:
    return f"line:{record['line']}" if record.get("response") is None else str(record["custom_id"])


def exactly_once(world: World, folder: Path) -> list[str]:
    problems = []
    for name in ("results.jsonl", "errors.jsonl"):
        path = folder / name
        raw = path.read_bytes().splitlines(keepends=True) if path.exists() else []
        if len(whole(path)) != len(raw):
            problems.append(f"{name} holds {len(raw) - len(whole(path))} torn or garbled line(s)")
    results = Counter(r["custom_id"] for r in whole(folder / "results.jsonl"))
    errors = Counter(error_key(r) for r in whole(folder / "errors.jsonl"))
    problems += [f"{k} is in results.jsonl {n} times" for k, n in results.items() if n > 1]
    problems += [f"{k} is in errors.jsonl {n} times" for k, n in errors.items() if n > 1]
    problems += [f"{k} is both a result and an error" for k in results.keys() & errors.keys()]
    want_results = {x.key for x in world.lines if x.ends == "result"}
    want_errors = {x.key for x in world.lines if x.ends == "error"}
    if missing := sorted(want_results - results.keys()):
        problems.append(f"results.jsonl lacks {missing}")
    if missing := sorted(want_errors - errors.keys()):
        problems.append(f"errors.jsonl lacks {missing}")
    if extra := sorted((results.keys() | errors.keys()) - want_results - want_errors):
        problems.append(f"unknown ids {extra}")
    return problems


def bought_twice(world: World, kept: list[tuple[str, set[str]]]) -> list[str]:
    """Each run's asked ids against what results.jsonl held before it: an id durably there
    is never asked for again; none is answered twice within a run."""
    tag_of = {x.key: x.tag for x in world.lines}
    problems = []
    for i, (label, asked, answered) in enumerate(world.endpoint.runs):
        problems += [f"{t} answered {n} times in the {label} run" for t, n in answered.items() if n > 1]
        for before, ids in kept[: i + 1]:
            again = sorted(t for t in asked if t in {tag_of.get(k) for k in ids})
            if again:
                problems.append(f"the {label} run asked again for {again}, kept in results.jsonl {before}")
    return problems


def kept_aside(world: World, template: Path) -> list[str]:
    """--fresh keeps what it moves aside: every file of the folder before it, whole, in one
    of OUT/previous-*/."""
    problems = []
    for before in (template / "out").iterdir():
        if before.name.startswith("."):
            continue
        aside = [p.read_bytes() for p in world.out.glob(f"previous-*/{before.name}")]
        if before.read_bytes() not in aside:
            problems.append(f"{before.name} is not kept whole in a previous-* folder")
    return problems


def kept_as_said(message: str, folder: Path) -> list[str]:
    """A stop that says how many results it kept says what the folder holds: the next run
    keeps every whole line of results.jsonl, no fewer (it would seem lost) and no more."""
    said = re.search(r"([\d,]+) results? kept there", message)
    if said is None:
        return []
    kept, held = int(said.group(1).replace(",", "")), len(whole(folder / "results.jsonl"))
    return [] if kept == held else [f"the stop says {kept} results kept, results.jsonl holds {held}"]


def lost_as_said(world: World, message: str, folder: Path) -> list[str]:
    """A stop that says how many answers arrived but could not be written says how many of
    this run's answers are in no file: those the next run asks for again."""
    if "results kept there" not in message:
        return []
    said = re.search(r"; ([\d,]+) answers? arrived but could not be written", message)
    lost = int(said.group(1).replace(",", "")) if said else 0
    tag_of = {x.key: x.tag for x in world.lines}
    held = {tag_of.get(custom_id) for custom_id in results_now(folder)}
    _, _, answered = world.endpoint.runs[-1]
    missing = [tag for tag in answered if tag not in held]
    return (
        [] if len(missing) == lost else [f"the stop says {lost} answers lost, {len(missing)} are in no file"]
    )


def results_now(folder: Path) -> set[str]:
    return {r["custom_id"] for r in whole(folder / "results.jsonl")}


# -- the harness ------------------------------------------------------------------------------------

Target = tuple[Site, int, str]  # the site, which call there, the fault


@dataclass
class Tally:
    sites: dict[str, int] = field(default_factory=dict)  # per scenario: sites a clean go reaches
    after: dict[str, int] = field(default_factory=dict)  # sites reached only on a fault's way
    instances: int = 0
    fired: int = 0
    problems: list[str] = field(default_factory=list)


def shown(targets: tuple[Target, ...]) -> str:
    return " then ".join(f"{fault} at call {nth} of {site}" for site, nth, fault in targets) or "clean"


async def instance(scenario: Scenario, base: World, template: Path, *targets: Target) -> list[str]:
    """One go: a copy of the prepared folder, then the command again and again, the faults
    armed until they fire (a site may be reached only when the command runs again), until it
    finishes once after they did. Returns what went wrong."""
    root = base.root.parent / f"{scenario.name}-{time.monotonic_ns()}"
    shutil.copytree(template, root)
    world = World(root, base.input, base.url, base.endpoint, base.lines)
    world.endpoint.runs = []
    kept = [("before it", results_now(scenario.final(world)))]
    problems: list[str] = []
    INJECTOR.arm(*targets)
    armed = {site for site, _, _ in targets}
    fired_in: int | None = None  # the run the faults fired in
    for attempt in range(5):
        label = f"run {attempt + 1}" + (" (faulted)" if fired_in is None else "")
        world.endpoint.begin(label)
        code, message = CANCELLED, ""
        with anyio.CancelScope() as scope:
            INJECTOR.cancel = cancelling(scope)
            try:
                code, message = await scenario.command(world)
            except Exception as e:
                code, message = 70, f"{type(e).__name__}: {e}"
        INJECTOR.cancel = None
        if fired_in is None and INJECTOR.fired >= armed:
            fired_in = attempt
        kept.append((f"after {label}", results_now(scenario.final(world))))
        if code not in (0, 1, 3, CANCELLED):
            problems.append(f"{label}: exit {code}: {message}")
        if code == 3 and str(world.root) not in message:
            problems.append(f"{label}: a stop that does not name the folder: {message}")
        problems += [f"{label}: {p}" for p in kept_as_said(message, scenario.final(world))]
        problems += [f"{label}: {p}" for p in lost_as_said(world, message, scenario.final(world))]
        # Done once it finished after the faults fired (or twice with them never reached).
        if code in (0, 1) and attempt > (fired_in or 0):
            break
    else:
        problems.append(f"the reruns did not finish: exit {code}: {message}")
    INJECTOR.disarm()
    problems += exactly_once(world, scenario.final(world))
    if scenario.again:
        problems += kept_aside(world, template)
    elif scenario.redo:
        problems += superseded_once(world, template)
    else:
        problems += bought_twice(world, kept)
    return [f"{scenario.name}, {shown(targets)}: {p}" for p in problems]


async def exercise(
    scenario: Scenario, tmp_path: Path, url: str, endpoint: Endpoint, tally: Tally, done: set[Site]
) -> None:
    base = World(tmp_path / f"{scenario.name}-base", tmp_path / f"{scenario.name}.jsonl", url, endpoint, [])
    base.lines = job_lines(scenario.lines)
    base.root.mkdir()
    endpoint.refuse = {x.tag for x in base.lines if x.tag and x.tag.startswith("no-")}
    await scenario.prepare(base)
    template = tmp_path / f"{scenario.name}-template"
    shutil.copytree(base.root, template)

    async def go(*targets: Target) -> set[Site]:
        """One instance, tallied; the sites it reached."""
        tally.problems += await instance(scenario, base, template, *targets)
        tally.instances += bool(targets)
        tally.fired += bool(targets) and INJECTOR.fired == {site for site, _, _ in targets}
        return set(INJECTOR.hits)

    # A clean go lists the sites the command reaches, and how often it reaches each.
    await go()
    reached = Counter(INJECTOR.hits)
    clean = Counter({s: n for s, n in reached.items() if not (scenario.new_sites_only and s in done)})
    tally.sites[scenario.name] = len(clean)
    # Each fails at its first call, and at one mid-way when it is called more often.
    after: dict[Site, Target] = {}  # a site only a fault's way reaches, and that fault
    for site, count in sorted(clean.items()):
        for nth in sorted({1, (count + 1) // 2}):
            for fault in faults(site):
                for other in await go((site, nth, fault)) - reached.keys():
                    if not (scenario.new_sites_only and other in done):
                        after.setdefault(other, (site, nth, fault))
    # The writes made while handling a failure (a cut back, a rollback...) fail in turn too.
    tally.after[scenario.name] = len(after)
    for site, first in sorted(after.items()):
        for fault in faults(site):
            await go(first, (site, 1, fault))
    done.update(clean, after)


async def test_every_write_fails_in_turn_and_every_line_still_ends_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LUMENFALL_API_KEY", FAKE_KEY)
    monkeypatch.setattr(writer_module, "SYNC_EVERY", 0.005)  # many checkpoints in a short run
    monkeypatch.setattr(markdown_module, "html_report", lambda doc: "<html></html>")  # charts: slow
    endpoint = Endpoint()
    app = web.Application()
    app.router.add_post("/{prefix:.*}chat/completions", endpoint.chat)
    app.router.add_get("/{prefix:.*}models", endpoint.models)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/v1"
    tally = Tally()
    began = time.monotonic()
    try:
        with installed():
            done: set[Site] = set()
            for scenario in SCENARIOS:
                await exercise(scenario, tmp_path, url, endpoint, tally, done)
    finally:
        await runner.cleanup()
    covered = sum(tally.sites.values()) + sum(tally.after.values())
    with capsys.disabled():
        print(
            f"\nwrite faults: {covered} sites failed in turn ("
            + ", ".join(
                f"{name} {n} + {tally.after[name]} on a fault's way" for name, n in tally.sites.items()
            )
            + f"), {tally.instances} faulted runs ({tally.fired} reached their fault), "
            f"{len(tally.problems)} problems, {time.monotonic() - began:.1f}s"
        )
        for problem in tally.problems:
            print("  " + problem)
    assert sum(tally.sites.values()) >= SITES_AT_LEAST
    assert tally.fired >= tally.instances * 0.9
    assert tally.problems == []


# -- the same, one by one ----------------------------------------------------------------------


@pytest.mark.parametrize("rolled_back", [True, False], ids=["SQLite rolled back", "SQLite did not"])
def test_a_commit_that_fails_commits_nothing_then_or_later(tmp_path: Path, rolled_back: bool) -> None:
    path = tmp_path / "ledger.sqlite"
    with installed() as injector:
        ledger = Ledger(path)
        ledger.add_done(["a"])
        ledger.put("results_offset", 10)
        ledger.commit()
        commit = next(site for site in injector.hits if site.op == "sqlite COMMIT")
        ledger.add_done(["b"])
        ledger.put("results_offset", 20)
        injector.arm((commit, 1, "EIO" if rolled_back else "ENOSPC"))
        with pytest.raises(sqlite3.OperationalError):
            ledger.commit()
        injector.disarm()
        # Nothing of the failed commit stays, whether SQLite rolled it back or not...
        assert ledger.done_count == 1
        assert ledger.get("results_offset") == 10
        # ...and what comes next waits for a commit: none is made statement by statement.
        ledger.add_done(["c"])
        assert committed(path) == ["a"]
        ledger._db.execute("ROLLBACK")  # as SQLite may after an I/O error in any statement
        ledger.add_done(["d"])
        assert committed(path) == ["a"]
        ledger.close(commit=False)


def test_a_commit_that_holds_though_sqlite_says_it_failed_is_counted_as_held(tmp_path: Path) -> None:
    # SQLite's temporary store full: COMMIT writes the index whole, then fails on the store.
    path = tmp_path / "ledger.sqlite"
    with installed() as injector:
        ledger = Ledger(path)
        ledger.add_done(["a"])
        ledger.commit()
        commit = next(site for site in injector.hits if site.op == "sqlite COMMIT")
        ledger.add_done(["b", "c"])
        injector.arm((commit, 1, "landed"))
        with pytest.raises(sqlite3.OperationalError, match="full"):
            ledger.commit()
        injector.disarm()
        assert committed(path) == ["a", "b", "c"]
        assert (ledger.landed, ledger.done_count) == (True, 3)  # not 1: "b" and "c" are kept
        ledger.add_done(["d"])
        ledger.commit()
        assert (ledger.landed, ledger.done_count, committed(path)) == (False, 4, ["a", "b", "c", "d"])
        ledger.close()


def committed(path: Path) -> list[str]:
    """The done ids another connection sees."""
    other = sqlite3.connect(path)
    try:
        return [i for (i,) in other.execute("SELECT id FROM done ORDER BY id")]
    finally:
        other.close()


async def test_answers_that_arrive_after_a_failed_write_are_written_before_the_run_ends(
    mock, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = appendfile.append_whole
    calls = 0

    def full_once(fd: int, data: bytes, size: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # then there is room again
        return real(fd, data, size)

    monkeypatch.setattr(appendfile, "append_whole", full_once)
    rows = [
        {"custom_id": f"job-{i}", "model": "m", "messages": [{"role": "user", "content": f"q job-{i}"}]}
        for i in range(200)
    ]
    async with mock(latency=0.002) as (url, server):
        summary = await pipeline.run(make_settings(url, rows, concurrency=8))
    assert summary.exit_code == 3
    answered = {body["messages"][0]["content"].split()[-1] for body in server.state.received}
    written = [r["custom_id"] for r in whole(tmp_path / "out/results.jsonl")]
    assert len(written) == len(set(written))
    assert set(written) == answered  # the batch that failed, and what came after, are all there
    assert f"{len(written)} results kept there" in summary.message
    assert "could not be written" not in summary.message.split("kept there")[1]


async def test_whole_lines_a_failed_append_could_not_cut_are_counted_kept(
    mock, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A batch goes in part way, then the disk fails, and so does the cut back: the whole lines
    # that went in stay, and the next run keeps them. The stop said "0 results kept" and
    # counted them among the answers to be asked for again.
    real = appendfile.append_whole
    failed = False

    def half_then_fail(fd: int, data: bytes, size: int) -> int:
        nonlocal failed
        if failed or data.count(b"\n") < 3:
            return real(fd, data, size)
        failed = True
        os.write(fd, data[: len(data) * 2 // 3])  # a line or more, and a torn one
        raise OSError(errno.EIO, os.strerror(errno.EIO))  # and the cut back failed too

    monkeypatch.setattr(appendfile, "append_whole", half_then_fail)
    rows = [
        {"custom_id": f"job-{i}", "model": "m", "messages": [{"role": "user", "content": f"q job-{i}"}]}
        for i in range(200)
    ]
    out = tmp_path / "out"
    async with mock(latency=0.005) as (url, server):
        summary = await pipeline.run(make_settings(url, rows, concurrency=16))
        assert failed
        kept = results_now(out)
        assert summary.exit_code == 3
        assert kept_as_said(summary.message, out) == []
        lost = re.search(r"; (\d+) answers? arrived but could not be written", summary.message)
        asked_first = len(server.state.received)
        assert asked_first == len(kept) + (int(lost.group(1)) if lost else 0)
        monkeypatch.setattr(appendfile, "append_whole", real)
        again = await pipeline.run(make_settings(url, rows, concurrency=16))
        asked_again = {b["messages"][0]["content"].split()[-1] for b in server.state.received[asked_first:]}
    assert again.exit_code == 0
    assert not asked_again & kept
    assert len(asked_again) == 200 - len(kept)
    written = [r["custom_id"] for r in whole(out / "results.jsonl")]
    assert sorted(written) == sorted(r["custom_id"] for r in rows)
    assert (out / "results.jsonl").read_bytes().endswith(b"\n")


def test_a_rewrite_that_fails_mid_way_lets_go_of_the_ledger_it_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # errors.jsonl is rewritten from the ledger's cursor. A write failing mid-way left that
    # cursor open for as long as the error lived (its traceback holds the lines being read),
    # so closing the ledger left its connection open, holding its lock: the next run in the
    # same process (a notebook, an Airflow worker) stopped on "database is locked", every time
    # (the fault harness found it: an EIO there, then a cancellation while the run ended).
    path = tmp_path / "ledger.sqlite"
    ledger = Ledger(path)
    ledger.add_failed([(f"id-{i}", i, "request", b"{}\n") for i in range(3)])
    ledger.commit()
    ledger.put("usage", {})  # a run's transaction, open
    real_open = Path.open

    class FailsSecondWrite(io.BufferedWriter):
        def write(self, data: Any) -> int:
            self.writes = getattr(self, "writes", 0) + 1
            if self.writes == 2:
                raise OSError(errno.EIO, "Input/output error")
            return super().write(data)

    def opened(self: Path, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if mode == "wb":
            return FailsSecondWrite(io.FileIO(self, "w"))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", opened)
    with pytest.raises(OSError, match="Input/output error") as failed:  # (kept alive, as a run keeps it)
        write_lines(tmp_path / "errors.jsonl", (record for *_, record in ledger.failures()))
    monkeypatch.undo()
    ledger.close(commit=False)
    again = Ledger(path)
    again.put("usage", {"runs": []})
    again.commit()  # "database is locked" while the first connection lingered
    again.close()
    assert failed.value.errno == errno.EIO
