"""pygal's CSS minified once per style, not once per chart.

pygal fills each chart's CSS files in with its style, colours and id, then minifies the text
with some twenty regular-expression passes: 3.7 ms of report.html's 25 ms for its eight
charts, every run. The charts of one report differ in their id (a random uuid4) and in their
colours, so the text is minified with a stand-in where the id was, and the stand-in put back:
the same bytes as pygal's own, since an id and its stand-in are both runs of word characters
and dashes of one length, which no pass of the minifier tells apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_UUID = re.compile(r"#chart-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
_STAND_IN = "00000000-0000-0000-0000-000000000000"
_KEPT = 64  # texts minified, kept: a report has a few styles (the colours of its charts)


class Minified:
    """pygal's `minify_css`, remembering what it made of a text (its chart id set aside)."""

    def __init__(self, minify: Callable[[str], str]) -> None:
        self.minify = minify
        self._made: dict[str, str] = {}

    def __call__(self, css: str) -> str:
        ids = set(_UUID.findall(css))
        if len(ids) != 1 or _STAND_IN in css:
            return self.minify(css)  # not one chart's text as pygal writes it: as pygal does
        (uuid,) = ids
        text = css.replace(uuid, _STAND_IN)
        made = self._made.get(text)
        if made is None:
            made = self.minify(text)
            if len(self._made) < _KEPT:
                self._made[text] = made
        return made.replace(_STAND_IN, uuid)


def install(svg: object) -> None:
    """Have pygal's SVG module (`pygal.svg`) minify through `Minified`, once a process."""
    minify = getattr(svg, "minify_css", None)
    if callable(minify) and not isinstance(minify, Minified):
        setattr(svg, "minify_css", Minified(minify))  # noqa: B010 (pygal is untyped)
