"""The live report.html (issue 24, point 3) in a real headless browser (Debian's chromium), with
the network cut off: opened once mid-run, it reloads itself and shows the run moving."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import pytest

from pipeline.run import live
from pipeline.run.runner import run
from pipeline.settings import Settings
from tests import screenshot
from tests.conftest import bodies, until
from tests.screenshot import Trap
from tests.scripted import scripted
from tests.test_report_live import REFRESH, Gate, _succeeded


def _chromium() -> str:
    binary = screenshot.chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: make test installs it (apt-get install chromium)")
        pytest.skip("chromium is missing: apt-get install chromium (make test installs it)")
    return binary


class _DevTools:
    """Chromium driven over its DevTools protocol (a websocket on 127.0.0.1): pages loaded and
    read as the browser has them, the events it sends kept in order."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.calls = 0
        self.events: list[dict[str, Any]] = []

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.calls += 1
        await self.ws.send_json({"id": self.calls, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json()
            if message.get("id") == self.calls:
                assert "error" not in message, message
                return dict(message.get("result", {}))
            self.events.append(message)

    async def loaded(self) -> str:
        """The page as the browser holds it at its next load: the first, or one it did itself."""
        while True:
            message = self.events.pop(0) if self.events else await self.ws.receive_json()
            if message.get("method") == "Page.loadEventFired":
                break
        root = (await self.call("DOM.getDocument"))["root"]["nodeId"]
        return str((await self.call("DOM.getOuterHTML", nodeId=root))["outerHTML"])


@contextlib.asynccontextmanager
async def _devtools(chromium: str, profile: Path, trap: Trap) -> AsyncIterator[_DevTools]:
    process = await anyio.open_process(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            f"--user-data-dir={profile}",
            f"--proxy-server=http://127.0.0.1:{trap.port}",
            "--proxy-bypass-list=<-loopback>",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        await until(lambda: port_file.exists() and len(port_file.read_text().splitlines()) >= 2)
        port = int(port_file.read_text().splitlines()[0])
        async with aiohttp.ClientSession() as session:
            async with session.get(f"http://127.0.0.1:{port}/json/list") as listed:
                targets = await listed.json()
            url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
            async with session.ws_connect(url, max_msg_size=0) as ws:
                yield _DevTools(ws)
    finally:
        process.terminate()
        with anyio.CancelScope(shield=True):
            await process.wait()


async def test_the_live_report_reloads_itself_in_a_browser_and_shows_the_run_moving(
    make_settings: Callable[..., Settings], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chromium = _chromium()
    monkeypatch.setattr(live, "REFRESH", 1.0)  # written every second, reloading every second
    gate = Gate()
    trap = Trap()
    async with scripted(gate.handle) as server:
        settings = make_settings(server.url, bodies(10), concurrency=2, timeout=120.0)
        page = settings.folder / "report.html"

        def live_at(n: int) -> bool:
            text = page.read_text() if page.exists() else ""
            return bool(REFRESH.search(text)) and _succeeded(text) == n

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, settings)
            await gate.allow(3)
            await until(lambda: live_at(3))
            # (a bound, not a measure: a browser that never reloads fails here rather than hangs)
            with anyio.fail_after(60):
                await _watch(chromium, tmp_path / "profile", trap, gate, page)
    trap.sock.close()
    # The page asked for nothing. (A connection that sent nothing before it closed asked for
    # nothing either: Chromium opens one to its proxy ahead of need, seen once in 8 runs at -n 2.)
    assert trap.page_asked() == []


async def _watch(chromium: str, profile: Path, trap: Trap, gate: Gate, page: Path) -> None:
    """The page opened once, mid-run, then only reloaded by itself: the count moves, and the
    run's last page stops the reloading."""
    async with _devtools(chromium, profile, trap) as browser:
        await browser.call("Page.enable")
        await browser.call("Page.navigate", url=page.as_uri())
        first = await browser.loaded()
        assert "Running: updated" in first
        assert REFRESH.search(first)
        assert _succeeded(first) == 3
        await gate.allow(6)
        # Nobody loads the page again but the page itself: each load is its own reload.
        seen = [3]
        while seen[-1] == 3:
            again = await browser.loaded()
            assert REFRESH.search(again), "the run ended before the browser saw it move"
            seen.append(_succeeded(again))
        assert seen[-1] == 6, seen
        await gate.allow(10)
        while REFRESH.search(again):  # until it loads the run's last page, which stays
            again = await browser.loaded()
        assert _succeeded(again) == 10
        assert "Final: written" in again
