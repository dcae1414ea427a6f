"""report.html opened in a real headless browser (Debian's chromium), with the network cut off,
by `tests.screenshot`: the code `make screenshot` takes the README's picture with."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import pytest

import pipeline
from tests import screenshot
from tests.conftest import bodies


def _chromium() -> None:
    if screenshot.chromium() is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: make test installs it (apt-get install chromium)")
        pytest.skip("chromium is missing: apt-get install chromium (make test installs it)")


async def test_the_report_opens_offline_draws_every_chart_and_asks_for_nothing(
    mock, make_settings, tmp_path: Path
) -> None:
    _chromium()
    async with mock(rpm=6000, fail_rate=0.05, latency=0.01) as (url, _):
        await pipeline.run(make_settings(url, bodies(200), max_attempts=10))
    report = tmp_path / "out" / "report.html"
    picture = tmp_path / "report.png"
    shot = await anyio.to_thread.run_sync(lambda: screenshot.shoot(report, picture, scratch=tmp_path))
    assert not shot.console, shot.console  # no error, no refused request, nothing logged by the page
    assert "Refused to" not in shot.stderr
    assert shot.asked == []  # the page asked the network for nothing
    from PIL import Image

    for drawn in (shot.page, shot.picture):
        with Image.open(drawn) as image:
            grey = image.convert("L")
            histogram = grey.histogram()
        dark = sum(histogram[:200]) / sum(histogram)
        assert dark > 0.01, (drawn, dark)  # drawn: bars, lines and text, not a blank page
        assert len([n for n in histogram if n]) > 20  # shades, not one colour
    with Image.open(shot.picture) as image:  # the README's picture: the top, in 256 colours
        assert image.size == (screenshot.WINDOW[0], screenshot.KEPT)
        assert image.mode == "P"
