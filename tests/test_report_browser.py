"""report.html opened in a real headless browser (Debian's chromium), with the network cut off."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import threading
from pathlib import Path

import anyio
import pytest

import pipeline
from tests.conftest import bodies


def _chromium() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: make test installs it (apt-get install chromium)")
        pytest.skip("chromium is missing: apt-get install chromium (make test installs it)")
    return binary


class _Trap:
    """A proxy that answers nothing and counts who tried: every request the page would make
    (http, https, websockets, DNS prefetch aside) comes here instead."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.asked: list[str] = []  # the first line of each request
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.settimeout(2)
            with contextlib.suppress(OSError):
                self.asked.append(conn.recv(4096).split(b"\r\n", 1)[0].decode(errors="replace"))
            conn.close()


async def test_the_report_opens_offline_draws_every_chart_and_asks_for_nothing(
    mock, make_settings, tmp_path: Path
) -> None:
    chromium = _chromium()
    async with mock(rpm=6000, fail_rate=0.05, latency=0.01) as (url, _):
        await pipeline.run(make_settings(url, bodies(200), max_attempts=10))
    page = tmp_path / "out" / "report.html"
    trap = _Trap()
    shot = tmp_path / "shot.png"
    done = await anyio.run_process(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-features=OptimizationHints,MediaRouter",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--proxy-server=http://127.0.0.1:{trap.port}",
            "--proxy-bypass-list=<-loopback>",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1100,2600",
            f"--screenshot={shot}",
            page.as_uri(),
        ],
        check=False,
    )
    trap.sock.close()
    stderr = done.stderr.decode(errors="replace")
    console = [line for line in stderr.splitlines() if "CONSOLE" in line]
    assert not console, console  # no error, no refused request, nothing logged by the page
    assert "Refused to" not in stderr
    # Chromium asks Google's servers for the time and for connectivity on its own, whatever
    # the page; the page itself asked the network for nothing.
    own = re.compile(r"^(GET http://|CONNECT )[^/:]*\.(google|googleapis|gstatic|gvt1)\.com[:/]")
    assert [asked for asked in trap.asked if not own.match(asked)] == []
    assert shot.exists(), stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        grey = image.convert("L")
        histogram = grey.histogram()
    dark = sum(histogram[:200]) / sum(histogram)
    assert dark > 0.01, dark  # drawn: bars, lines and text, not a blank page
    assert len([n for n in histogram if n]) > 20  # shades, not one colour
