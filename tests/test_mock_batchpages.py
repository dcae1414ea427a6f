"""The mock's pages of an inline batch's results (`mock.batchpages`), served from an index of
where each line starts: whatever the page size, every result comes once and in order, each
page whole JSON; a cursor names the line a page starts at; a cursor past the end, or one that
is not the mock's, is refused, never a crash nor a page of broken JSON."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.mock.batchpages import MOST_A_PAGE, PAGE, Pages, cursor_of

# Result lines as a provider stores them: one JSON object a line (its strings may hold line
# breaks, escaped, and any character).
ROWS = st.lists(st.text(max_size=12), max_size=12).map(
    lambda texts: [{"custom_id": f"job-{i}", "text": text} for i, text in enumerate(texts)]
)
QUICK = settings(max_examples=200)  # (files written an example: a few seconds in all)


def stored(rows: list[dict[str, Any]], folder: Path) -> Pages:
    path = folder / "results.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    return Pages(path)


def read(pages: Pages, cursor: str | None, limit: str | None) -> dict[str, Any] | None:
    body = pages.page(cursor=cursor, limit=limit)
    return None if body is None else dict(orjson.loads(body))


@QUICK
@given(rows=ROWS, limit=st.integers(1, 14))
def test_paging_gives_every_result_once_in_order_whatever_the_page_size(
    rows: list[dict[str, Any]], limit: int
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        pages = stored(rows, Path(folder))
        got: list[Any] = []
        cursor: str | None = None
        while True:
            page = read(pages, cursor, str(limit))
            assert page is not None
            assert len(page["data"]) <= limit
            got += page["data"]
            cursor = page["next_cursor"]
            if not page["has_more"]:
                break
            assert len(page["data"]) == limit  # (only the last page is short)
            assert cursor
        assert got == rows
        assert cursor is None


@QUICK
@given(rows=ROWS, start=st.integers(-3, 15), limit=st.integers(1, 14))
def test_a_cursor_names_the_line_a_page_starts_at_and_one_past_the_end_is_refused(
    rows: list[dict[str, Any]], start: int, limit: int
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        pages = stored(rows, Path(folder))
        page = read(pages, cursor_of(start), str(limit))
        if not 0 <= start < len(rows):
            assert page is None
            return
        assert page is not None
        assert page["data"] == rows[start : start + limit]
        more = start + limit < len(rows)
        assert page["has_more"] is more
        assert page["next_cursor"] == (cursor_of(start + limit) if more else None)


@QUICK
@given(rows=ROWS, cursor=st.text(max_size=12), limit=st.text(max_size=5) | st.none())
def test_any_cursor_or_limit_is_a_page_of_the_results_or_refused(
    rows: list[dict[str, Any]], cursor: str, limit: str | None
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        page = read(stored(rows, Path(folder)), cursor, limit)
        if page is None:
            return
        data = page["data"]
        assert 1 <= len(data) <= MOST_A_PAGE or (not rows and not data)
        assert any(rows[i : i + len(data)] == data for i in range(len(rows) + 1))


def test_the_default_page_the_largest_the_last_and_the_bad(tmp_path: Path) -> None:
    rows = [{"custom_id": f"job-{i}", "text": "two\nlines"} for i in range(2 * MOST_A_PAGE + 5)]
    pages = stored(rows, tmp_path)
    first = read(pages, None, None)
    assert first is not None
    assert first["data"] == rows[:PAGE]
    largest = read(pages, cursor_of(MOST_A_PAGE), "100000")
    assert largest is not None
    assert largest["data"] == rows[MOST_A_PAGE : 2 * MOST_A_PAGE]
    assert largest["has_more"] is True
    last = read(pages, largest["next_cursor"], "0")  # (at least one)
    assert last is not None
    assert last["data"] == rows[2 * MOST_A_PAGE : 2 * MOST_A_PAGE + 1]
    for cursor, limit in (
        (cursor_of(len(rows)), "5"),
        ("bm90IGEgbnVtYmVy", "5"),
        ("%%%", "5"),
        (None, "ten"),
    ):
        assert pages.page(cursor=cursor, limit=limit) is None
    empty = read(stored([], tmp_path), None, "5")
    assert empty == {"object": "list", "data": [], "has_more": False, "next_cursor": None}
