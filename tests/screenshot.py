"""report.html in a real headless browser (Debian's chromium), with the network cut off: the
README's picture and what tests/test_report_browser.py checks, taken by the same code.

    python -m tests.screenshot out/demo/report.html docs/report.png

is what `make screenshot` runs, on the report of `make run`'s demo: the page drawn, checked to
ask for nothing and log nothing, and its top (the totals and the charts over time) kept as a
PNG of 256 colours.
"""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

WINDOW = (1100, 2600)  # the page as Chromium draws it, in CSS pixels
KEPT = 1500  # the top of it that the README shows: the totals and the charts over time
# Chromium asks Google's servers for the time and for connectivity on its own, whatever the page.
OWN = re.compile(r"^(GET http://|CONNECT )[^/:]*\.(google|googleapis|gstatic|gvt1)\.com[:/]")


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Trap:
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

    def page_asked(self) -> list[str]:
        """What the page asked the network for: Chromium's own asks to Google aside, and a
        connection it opened ahead of need and sent nothing on."""
        return [asked for asked in self.asked if asked and not OWN.match(asked)]


@dataclass(frozen=True)
class Shot:
    page: Path  # the whole window, as Chromium drew it
    picture: Path  # its top, as the README shows it
    stderr: str
    console: list[str]  # what the page logged: an error, a refused request...
    asked: list[str]  # what the page asked the network for (Chromium's own asks to Google aside)


def shoot(report: Path, picture: Path, *, scratch: Path) -> Shot:
    """Open `report` in headless Chromium with every request sent to a trap, screenshot it
    into `scratch`, and keep its top as `picture`. Raises RuntimeError without a chromium."""
    binary = chromium()
    if binary is None:
        raise RuntimeError("chromium is missing: apt-get install chromium (make system-deps installs it)")
    trap = Trap()
    page = scratch / "page.png"
    try:
        done = subprocess.run(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--hide-scrollbars",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-features=OptimizationHints,MediaRouter",
                f"--user-data-dir={scratch / 'profile'}",
                f"--proxy-server=http://127.0.0.1:{trap.port}",
                "--proxy-bypass-list=<-loopback>",
                "--enable-logging=stderr",
                "--v=0",
                f"--window-size={WINDOW[0]},{WINDOW[1]}",
                f"--screenshot={page}",
                report.resolve().as_uri(),
            ],
            capture_output=True,
            check=False,
            timeout=120,
        )
    finally:
        trap.sock.close()
    stderr = done.stderr.decode(errors="replace")
    if not page.exists():
        raise RuntimeError(f"chromium drew nothing (exit {done.returncode}): {stderr[-2000:]}")
    from PIL import Image

    with Image.open(page) as image:
        top = image.crop((0, 0, image.width, min(KEPT, image.height)))
    # 256 colours hold the page (text, lines, a few fills): a fifth of the bytes of full colour.
    # (The fast octree: a twentieth of the median cut's time, and fewer bytes on these pages.)
    top.convert("RGB").quantize(colors=256, method=Image.Quantize.FASTOCTREE).save(picture)
    return Shot(
        page=page,
        picture=picture,
        stderr=stderr,
        console=[line for line in stderr.splitlines() if "CONSOLE" in line],
        asked=trap.page_asked(),
    )


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m tests.screenshot REPORT.html PICTURE.png", file=sys.stderr)
        return 2
    report, picture = Path(argv[0]), Path(argv[1])
    if not report.is_file():
        print(f"screenshot: {report} not found (make run writes it)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        try:
            shot = shoot(report, Path(scratch) / "picture.png", scratch=Path(scratch))
        except RuntimeError as e:
            print(f"screenshot: {e}", file=sys.stderr)
            return 1
        if shot.console or shot.asked or "Refused to" in shot.stderr:
            print(f"screenshot: the page logged {shot.console}, asked for {shot.asked}", file=sys.stderr)
            return 1
        shutil.copyfile(shot.picture, picture)  # (only a picture of a page that passed)
    print(f"{picture}: {report} drawn, its top {KEPT} px kept, {picture.stat().st_size / 1024:,.0f} KB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
