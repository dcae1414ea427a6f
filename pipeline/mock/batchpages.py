"""An ended inline batch's results, served a page at a time as a provider serves them: from an
index of where each result line starts (8 bytes a line, made once as the batch ends, in the
worker thread that wrote the lines), a page is one seek and one read of the file, sent as the
bytes stored: no line is parsed or encoded again to serve it, and no result is held between
pages. (Each stored line is one JSON object on one line, as orjson writes it: the page's
`data` is its lines with commas between.)

The cursor names the line a page starts at (opaque to the client: base64 of the number). A
cursor that names no line of the batch (past its end, negative, not a number) is refused, as
a cursor that is not the server's.
"""

from __future__ import annotations

import base64
from array import array
from pathlib import Path

import orjson

PAGE, MOST_A_PAGE = 100, 1000  # results a page by default, and at most (OpenRouter: 1 to 1,000)


def cursor_of(line: int) -> str:
    return base64.urlsafe_b64encode(str(line).encode()).decode()


def line_of(cursor: str) -> int | None:
    """The line a cursor names; None for one that names none (not ours)."""
    try:
        return int(base64.urlsafe_b64decode(cursor.encode()).decode())
    except ValueError:  # (binascii.Error and UnicodeDecodeError are ValueErrors)
        return None


class Pages:
    """The results file at `path`, indexed by line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.starts = array("Q")  # where each line starts
        with path.open("rb") as lines:
            at = 0
            for line in lines:
                self.starts.append(at)
                at += len(line)
        self.end = at

    @property
    def lines(self) -> int:
        return len(self.starts)

    def page(self, *, cursor: str | None, limit: str | None) -> bytes | None:
        """The page's JSON (`data`, `has_more`, `next_cursor`); None for a cursor or a limit
        that is not ours."""
        first = line_of(cursor) if cursor else 0
        try:
            wanted = min(max(int(limit), 1), MOST_A_PAGE) if limit else PAGE
        except ValueError:
            return None
        if first is None or first < 0 or (first >= self.lines and cursor):
            return None
        last = min(first + wanted, self.lines)
        data = b""
        if last > first:
            begin, end = self.starts[first], self.starts[last] if last < self.lines else self.end
            with self.path.open("rb") as f:
                f.seek(begin)
                data = f.read(end - begin).rstrip(b"\n").replace(b"\n", b",")
        more = last < self.lines
        after = orjson.dumps(cursor_of(last) if more else None)
        return b'{"object":"list","data":[%b],"has_more":%b,"next_cursor":%b}' % (
            data,
            b"true" if more else b"false",
            after,
        )
