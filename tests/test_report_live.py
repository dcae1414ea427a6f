"""report.html while a run goes: written again as the run goes, whole each time, reloading
itself until the run's end writes it once more without a reload. (In a browser:
`tests/test_report_browser.py`.)"""

from __future__ import annotations

import asyncio
import errno
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from aiohttp import web

from pipeline.account.usage import Usage
from pipeline.report import html as html_module
from pipeline.report.html import html_report
from pipeline.report.markdown import usage_document
from pipeline.run import live
from pipeline.run.runner import run
from pipeline.send.batchapi import BatchInfo
from pipeline.settings import Settings
from tests.conftest import bodies, until
from tests.fakebatchapi import FakeBatchApi, FakeHost, at_batch_tier
from tests.scripted import answer, json, scripted

REFRESH = re.compile(r'<meta http-equiv="refresh" content="(\d+)">')
SUCCEEDED = re.compile(r'<tr><td>succeeded</td><td class="n">([\d,]+)</td></tr>')


class Gate:
    """An endpoint that answers as many requests as the test has allowed, and holds the rest."""

    def __init__(self) -> None:
        self.allowed = 0
        self.served = 0
        self._changed = asyncio.Condition()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not request.path.endswith("/chat/completions"):
            return json({"object": "list", "data": []})
        body = await request.json()
        async with self._changed:
            await self._changed.wait_for(lambda: self.served < self.allowed)
            self.served += 1
        return answer(body)

    async def allow(self, n: int) -> None:
        async with self._changed:
            self.allowed = n
            self._changed.notify_all()


class Reader:
    """Reads report.html over and over as a browser reloading it would, keeping each page."""

    def __init__(self, page: Path) -> None:
        self.page = page
        self.pages: list[str] = []  # each page read, once (in the order first read)
        self.reads = 0

    async def read_on(self) -> None:
        while True:
            try:
                text = self.page.read_text()
            except FileNotFoundError:
                text = None
            if text is not None:
                self.reads += 1
                if not self.pages or text != self.pages[-1]:
                    self.pages.append(text)
            await anyio.sleep(0.001)

    def live_counts(self) -> list[int]:
        return [_succeeded(p) for p in self.pages if REFRESH.search(p)]


def _succeeded(page: str) -> int:
    found = SUCCEEDED.search(page)
    assert found is not None, page[:2000]
    return int(found[1].replace(",", ""))


def _whole(page: str) -> bool:
    return page.startswith("<!doctype html>") and page.rstrip().endswith("</body></html>")


@pytest.fixture
def often(monkeypatch: pytest.MonkeyPatch) -> None:
    """The page written every 20 ms at most (and as often as it takes to write)."""
    monkeypatch.setattr(live, "REFRESH", 0.02)
    monkeypatch.setattr(live, "SHARE", 1.0)


async def test_the_page_is_written_whole_as_the_run_goes_and_the_last_does_not_reload(
    make_settings: Callable[..., Settings], often: None
) -> None:
    gate = Gate()
    async with scripted(gate.handle) as server:
        settings = make_settings(server.url, bodies(12), concurrency=2, timeout=60.0)
        reader = Reader(settings.folder / "report.html")
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.read_on)
            async with anyio.create_task_group() as running:
                running.start_soon(run, settings)
                for allowed in (3, 7):
                    await gate.allow(allowed)
                    await until(lambda n=allowed: n in reader.live_counts(), within=30)  # type: ignore[misc]
                await gate.allow(12)
            await until(lambda: bool(reader.pages) and not REFRESH.search(reader.pages[-1]), within=30)
            tg.cancel_scope.cancel()
    live_pages = [p for p in reader.pages if REFRESH.search(p)]
    assert all(_whole(p) for p in reader.pages), [p[-200:] for p in reader.pages if not _whole(p)]
    assert reader.reads > len(reader.pages)  # (read while being written, not once each)
    # While it goes: the count moves, the page says it is running and reloads every few seconds.
    counts = reader.live_counts()
    assert counts == sorted(counts), counts
    assert {3, 7} <= set(counts), counts
    assert all("Running: updated" in p and REFRESH.findall(p) == ["1"] for p in live_pages)
    # The run's end: the same file, no reload, saying it is final, every line counted.
    final = (settings.folder / "report.html").read_text()
    assert reader.pages[-1] == final
    assert "refresh" not in final
    assert "Final: written" in final
    assert "Running" not in final
    assert _succeeded(final) == 12
    assert not list(settings.folder.glob(".report.html.*"))  # no temporary file left


async def test_a_page_that_cannot_be_written_is_said_once_and_the_run_goes_on(
    make_settings: Callable[..., Settings],
    often: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    tried: list[Path] = []

    def full(path: Path, lines: Any, *, suffix: str = "tmp") -> int:
        tried.append(path)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(live, "write_lines", full)
    gate = Gate()
    async with scripted(gate.handle) as server:
        settings = make_settings(server.url, bodies(4), timeout=60.0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(gate.allow, 2)
            summary_box: list[Any] = []

            async def going() -> None:
                summary_box.append(await run(settings))

            tg.start_soon(going)
            await until(lambda: len(tried) >= 3, within=30)
            await gate.allow(4)
    summary = summary_box[0]
    assert summary.exit_code == 0, summary.message
    assert summary.succeeded == 4
    said = [
        line
        for line in capsys.readouterr().err.splitlines()
        if "could not be written as the run goes" in line
    ]
    assert len(said) == 1, said
    assert "No space left on device" in said[0]
    assert "refresh" not in (settings.folder / "report.html").read_text()  # the end's, as always


class _HeldBatches(FakeBatchApi):
    """Batches that stay in progress until the run's live page shows them."""

    def __init__(self, page: Path) -> None:
        super().__init__()
        self.page = page

    async def get(self, batch_id: str) -> BatchInfo:
        def shown() -> bool:
            text = self.page.read_text() if self.page.exists() else ""
            return "Running: updated" in text and "<h2>Batches</h2>" in text

        await until(shown, within=30)
        return await super().get(batch_id)


async def test_a_batch_run_shows_its_batches_while_it_waits_for_them(
    make_settings: Callable[..., Settings], server: tuple[str, Any], often: None
) -> None:
    settings = at_batch_tier(make_settings(server[0], bodies(3)))
    api = _HeldBatches(settings.folder / "report.html")
    summary = await run(settings, FakeHost(api))
    assert summary.exit_code == 0, summary.message
    final = (settings.folder / "report.html").read_text()
    assert "refresh" not in final
    assert "<h2>Batches</h2>" in final


def test_only_the_live_page_reloads_and_its_policy_is_the_same() -> None:
    doc = usage_document(
        Usage(), state={"succeeded": 1, "failed": 0, "pending": 2, "lines": 3}, folder=Path("o")
    )
    running, final = html_report(doc, refresh=5), html_report(doc)
    policy = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
    )
    for page in (running, final):
        assert policy == html_module.CSP
        assert f'content="{policy}"' in page
        assert "<script" not in page.lower()
    assert REFRESH.findall(running) == ["5"]
    assert "reloads every 5 s" in running
    assert not REFRESH.search(final)
    assert 'http-equiv="refresh"' not in final


async def test_a_redo_run_shows_live_the_results_its_end_would_count(
    make_settings: Callable[..., Settings], often: None, tmp_path: Path
) -> None:
    """A line a redo chose keeps its earlier answer until the new one comes: the final page
    counts it a result (held), so the live page must not show it gone meanwhile."""
    import orjson

    gate = Gate()
    async with scripted(gate.handle) as server:
        settings = make_settings(server.url, bodies(4), timeout=60.0)
        await gate.allow(4)
        assert (await run(settings)).succeeded == 4
        assert _succeeded((settings.folder / "report.html").read_text()) == 4
        ids = tmp_path / "redo.txt"
        lines = (settings.folder / "results.jsonl").read_bytes().splitlines()
        ids.write_text("".join(orjson.loads(line)["custom_id"] + "\n" for line in lines[:2]))
        again = make_settings(server.url, redo=f"ids:{ids}", input=settings.input, timeout=60.0)
        reader = Reader(again.folder / "report.html")
        async with anyio.create_task_group() as tg:
            tg.start_soon(reader.read_on)
            async with anyio.create_task_group() as running:
                running.start_soon(run, again)
                await until(lambda: bool(reader.live_counts()), within=30)
                await gate.allow(6)
            tg.cancel_scope.cancel()
    assert _succeeded((again.folder / "report.html").read_text()) == 4
    assert set(reader.live_counts()) == {4}, reader.live_counts()


async def test_a_run_that_ends_in_a_bug_leaves_no_page_that_says_it_is_running(
    make_settings: Callable[..., Settings], often: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """exit 70 skips `finish`, which writes the final page: the last live one stays, saying
    "Running" and reloading, for ever."""
    from pipeline.run import runner

    def bug(*_: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(runner, "finish", bug)
    gate = Gate()
    async with scripted(gate.handle) as server:
        settings = make_settings(server.url, bodies(4), timeout=60.0)
        page = settings.folder / "report.html"
        await gate.allow(2)
        raised: list[BaseException] = []

        async def going() -> None:
            try:
                await run(settings)
            except RuntimeError as e:  # (the CLI says it, and exits 70)
                raised.append(e)

        async with anyio.create_task_group() as tg:
            tg.start_soon(going)
            await until(lambda: page.exists() and "Running" in page.read_text(), within=30)
            await gate.allow(4)
    assert raised
    assert not REFRESH.search(page.read_text())
    assert "Stopped: the run ended in an error" in page.read_text()
