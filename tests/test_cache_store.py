"""The answer cache's store: what is kept comes back whole, in any later run; it stays under
its bound, the least recently used out first; and a broken cache never fails a run."""

from __future__ import annotations

import hashlib
import random
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.cache import store as store_module
from pipeline.cache.pack import pack
from pipeline.cache.store import FILE, Answer, AnswerCache


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def k(i: int | str) -> bytes:
    return hashlib.sha256(str(i).encode()).digest()


def body(i: int, words: int = 40) -> bytes:
    text = " ".join(f"word{(i * 7 + j) % 97}" for j in range(words))
    return orjson.dumps(
        {
            "id": f"chatcmpl-{i}",
            "object": "chat.completion",
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 100 + i, "completion_tokens": words, "total_tokens": 100 + i + words},
        }
    )


def sums(path: Path) -> tuple[int, int, int, int]:
    """The running totals, and what the table says they should be."""
    with sqlite3.connect(path) as db:
        bytes_, rows = db.execute(store_module._TOTALS).fetchone()
        total, count = db.execute("SELECT coalesce(sum(size), 0), count(*) FROM answers").fetchone()
    return bytes_, total, rows, count


def test_an_answer_kept_comes_back_whole_in_a_later_run(tmp_path: Path) -> None:
    folder = tmp_path / "made" / "here"
    warned: list[str] = []
    first = AnswerCache(folder, warn=warned.append)
    answer = Answer(body(1, words=300), "gpt-4o-mini", 0.000123, "batch", 1_700_000_000.5)
    first.put(k(1), answer)
    assert first.get(k(1)) == answer  # queued, seen at once
    first.flush()
    first.put(k(1), Answer(b"{}", "other", None))  # the first answer of a key stays
    first.close()
    later = AnswerCache(folder, warn=warned.append)
    assert later.get(k(1)) == answer
    assert later.get(k(2)) is None
    # A key sharing the row's id (its first 8 bytes) is not served the other's answer.
    assert later.get(k(1)[:8] + bytes(24)) is None
    later.close()
    assert warned == []
    assert (folder / FILE).exists()


def test_puts_are_written_in_batches_and_flushed_by_close(tmp_path: Path) -> None:
    clock = Clock()
    cache = AnswerCache(tmp_path, clock=clock)
    for i in range(store_module.FLUSH_ROWS - 1):
        cache.put(k(i), Answer(body(i), "m", 0.001))
    assert not cache.due
    clock.now += store_module.FLUSH_EVERY
    assert cache.due  # answers queued a second: time to write them
    cache.put(k("last"), Answer(body(0), "m", 0.001))
    cache.close()
    bytes_, total, rows, count = sums(tmp_path / FILE)
    assert (rows, bytes_) == (count, total) == (store_module.FLUSH_ROWS, total)


def test_it_stays_under_its_bound_and_the_least_recently_used_go_first(tmp_path: Path) -> None:
    clock = Clock()
    probe = AnswerCache(tmp_path / "probe", clock=clock)
    probe.put(k(0), Answer(body(0), "m", None))
    probe.close()
    per_answer = sums(tmp_path / "probe" / FILE)[0]
    bound = 50 * per_answer
    cache = AnswerCache(tmp_path / "c", max_gb=bound / 1e9, clock=clock)
    for i in range(40):  # a minute apart, oldest first
        cache.put(k(i), Answer(body(i), "m", None))
        cache.flush()
        clock.now += 60
    assert cache.get(k(0)) is not None  # the oldest, used again: now among the newest
    for i in range(40, 60):
        cache.put(k(i), Answer(body(i), "m", None))
        cache.flush()
        clock.now += 60
    bytes_, total, rows, count = sums(tmp_path / "c" / FILE)
    assert (bytes_, rows) == (total, count)
    assert bytes_ <= bound
    kept = {i for i in range(60) if cache.get(k(i)) is not None}
    assert 0 in kept
    assert {1, 2, 3, 4, 5} & kept == set()  # the oldest unused went first
    assert set(range(45, 60)) <= kept  # the newest stay
    cache.close()


def test_a_use_within_the_minute_is_not_written_again(tmp_path: Path) -> None:
    clock = Clock()
    cache = AnswerCache(tmp_path, clock=clock)
    cache.put(k(1), Answer(body(1), "m", None))
    cache.flush()
    writes: list[str] = []
    assert cache._writer is not None
    cache._writer.set_trace_callback(writes.append)
    for _ in range(150):  # 75 seconds of uses
        clock.now += 0.5
        assert cache.get(k(1)) is not None
        cache.flush()
    assert len([w for w in writes if w.startswith("UPDATE answers SET used")]) == 1
    cache.close()


def damaged(path: Path) -> None:
    """A cache with answers whose pages past the first are overwritten."""
    cache = AnswerCache(path.parent)
    for i in range(200):
        cache.put(k(i), Answer(body(i, words=200), "m", None))
    cache.close()
    with path.open("r+b") as f:
        f.seek(4096)
        f.write(b"\xa5" * 200_000)


@pytest.mark.parametrize("harm", ["not a database", "pages overwritten"])
def test_a_damaged_file_is_one_warning_and_the_run_goes_on_without_it(tmp_path: Path, harm: str) -> None:
    path = tmp_path / FILE
    if harm == "not a database":
        path.write_bytes(b"these are not the answers you are looking for" * 100)
    else:
        damaged(path)
    warned: list[str] = []
    cache = AnswerCache(tmp_path, warn=warned.append)
    for i in range(200):
        assert cache.get(k(i)) is None
        cache.put(k(1000 + i), Answer(body(i), "m", None))
    cache.flush()
    cache.close()
    assert len(warned) == 1
    assert str(path) in warned[0]
    assert "goes on without it" in warned[0]
    assert "move it away" in warned[0]


def test_a_cache_of_a_newer_format_is_left_alone_with_one_warning(tmp_path: Path) -> None:
    AnswerCache(tmp_path).close()
    with sqlite3.connect(tmp_path / FILE) as db:
        db.execute("UPDATE meta SET value = 2 WHERE name = 'format'")
    warned: list[str] = []
    cache = AnswerCache(tmp_path, warn=warned.append)
    cache.put(k(1), Answer(body(1), "m", None))
    cache.close()
    assert len(warned) == 1
    assert "newer pipeline" in warned[0]
    with sqlite3.connect(tmp_path / FILE) as db:
        assert db.execute("SELECT count(*) FROM answers").fetchone() == (0,)


def test_a_folder_it_cannot_write_is_one_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # (the tests may run as root, whom no file mode stops: SQLite's read-only open stands in)
    AnswerCache(tmp_path).close()
    connect = sqlite3.connect

    def read_only(path: Path | str, **kw: Any) -> sqlite3.Connection:
        if kw.pop("uri", False):  # (the cache opened to be read only, by a URI of its own)
            return connect(path, uri=True, **kw)
        return connect(f"file:{path}?mode=ro", uri=True, **kw)

    monkeypatch.setattr(store_module.sqlite3, "connect", read_only)
    warned: list[str] = []
    cache = AnswerCache(tmp_path, warn=warned.append)
    assert cache.get(k(1)) is None
    cache.put(k(1), Answer(body(1), "m", None))
    cache.close()
    assert len(warned) == 1
    assert "this run can write" in warned[0]

    blocked: list[str] = []
    (tmp_path / "a file").write_text("in the way")
    AnswerCache(tmp_path / "a file" / "cache", warn=blocked.append).close()
    assert len(blocked) == 1
    assert "this run can write" in blocked[0]


def test_a_full_disk_stops_the_keeping_not_the_reuse(tmp_path: Path) -> None:
    warned: list[str] = []
    cache = AnswerCache(tmp_path, warn=warned.append)
    cache.put(k(0), Answer(body(0), "m", None))
    cache.flush()
    assert cache._writer is not None
    (pages,) = cache._writer.execute("PRAGMA page_count").fetchone()
    cache._writer.execute(f"PRAGMA max_page_count={pages}")  # (SQLite's own SQLITE_FULL)
    for i in range(1, 400):
        cache.put(k(i), Answer(body(i, words=300), "m", None))
    cache.flush()
    cache.put(k("after"), Answer(body(1), "m", None))
    assert cache.get(k("after")) is None  # no longer queued
    assert cache.get(k(0)) is not None
    cache.close()
    assert len(warned) == 1
    assert "can no longer be kept" in warned[0]
    assert "Free space" in warned[0]


def test_a_busy_database_keeps_the_queue_for_the_next_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "BUSY_MS", 20)
    warned: list[str] = []
    cache = AnswerCache(tmp_path, warn=warned.append)
    other = sqlite3.connect(tmp_path / FILE, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another shard writing, for longer than the busy timeout
    cache.put(k(1), Answer(body(1), "m", None))
    cache.flush()
    assert cache.get(k(1)) is not None  # still queued
    other.execute("COMMIT")
    other.close()
    cache.flush()
    cache.close()
    assert AnswerCache(tmp_path).get(k(1)) is not None
    assert warned == []


def test_a_damaged_answer_is_a_miss_not_another_body(tmp_path: Path) -> None:
    cache = AnswerCache(tmp_path)
    cache.put(k(1), Answer(body(1), "m", None))
    cache.close()
    with sqlite3.connect(tmp_path / FILE) as db:
        (kept,) = db.execute("SELECT body FROM answers").fetchone()
        db.execute("UPDATE answers SET body = ?", (kept[:2] + bytes([kept[2] ^ 4]) + kept[3:],))
    cache = AnswerCache(tmp_path)
    assert cache.get(k(1)) is None  # (sent again)
    cache.close()


@pytest.mark.parametrize("oldest", ["shorter", "longer"])
def test_over_its_bound_it_evicts_to_the_low_mark_and_no_further(tmp_path: Path, oldest: str) -> None:
    # Answers of mixed lengths: 2,000 short ones and 15 long ones, the first kind put first.
    clock = Clock()
    rng = random.Random(3)
    short = [rng.randbytes(40) for _ in range(2000)]
    long = [rng.randbytes(40_000) for _ in range(15)]
    bound = 1_000_000
    cache = AnswerCache(tmp_path, max_gb=bound / 1e9, clock=clock)
    first, then = (short, long) if oldest == "shorter" else (long, short)
    for n, batch in enumerate((first, then)):
        for i, kept in enumerate(batch):
            cache.put(k(f"{n}-{i}"), Answer(kept, "m", None))
            if i % 100 == 99 or n == 0 or len(batch) < 100:
                cache.flush()
                clock.now += 60
    cache.flush()
    bytes_, total, rows, count = sums(tmp_path / FILE)
    assert (bytes_, rows) == (total, count)
    assert 0.85 * bound <= bytes_ <= bound  # (it cut the cache to a quarter, or a tenth, of it)
    cache.close()


def test_under_the_bound_a_long_answer_is_not_evicted_to_reach_the_low_mark(tmp_path: Path) -> None:
    # Six short answers, a long one, then one that takes the total just over the bound: the
    # six short ones going leave it under the bound, one byte over the low mark.
    clock = Clock()
    rng = random.Random(8)
    cache = AnswerCache(tmp_path, max_gb=5000 / 1e9, clock=clock)
    for i, length in enumerate([1, 1, 1, 1, 1, 1, 2551, 453]):
        cache.put(k(i), Answer(rng.randbytes(length), "m", None))
        cache.flush()
        clock.now += 60
    assert [i for i in range(8) if cache.get(k(i)) is not None] == [6, 7]  # (the long one went too)
    assert cache.totals()[0] > 4000
    cache.close()


def test_an_answer_bigger_than_the_bound_is_not_kept_and_evicts_nothing(tmp_path: Path) -> None:
    clock = Clock()
    bound = 500_000
    cache = AnswerCache(tmp_path, max_gb=bound / 1e9, clock=clock)
    for i in range(100):
        cache.put(k(i), Answer(body(i), "m", None))
    cache.flush()
    clock.now += 60
    before = cache.totals()
    huge = random.Random(1).randbytes(bound)
    cache.put(k("huge"), Answer(huge, "m", None))
    cache.flush()
    assert cache.totals() == before  # (every other answer was evicted for it, then it too)
    assert cache.get(k("huge")) is None
    assert all(cache.get(k(i)) is not None for i in range(100))
    cache.close()


def test_answers_queued_when_the_clock_goes_back_are_still_flushed_soon(tmp_path: Path) -> None:
    clock = Clock()
    cache = AnswerCache(tmp_path, clock=clock)
    clock.now -= 3600  # (the system clock set back an hour)
    cache.put(k(1), Answer(body(1), "m", None))
    assert cache.due  # (it waited for the hour to come round again)
    cache.close()


def test_answers_bought_after_the_clock_went_back_are_not_the_first_evicted(tmp_path: Path) -> None:
    clock = Clock()
    same = body(0)
    probe = AnswerCache(tmp_path / "probe", clock=clock)
    probe.put(k(0), Answer(same, "m", None))
    probe.close()
    per_answer = sums(tmp_path / "probe" / FILE)[0]
    cache = AnswerCache(tmp_path / "c", max_gb=(30.5 * per_answer) / 1e9, clock=clock)
    order = ["before", "after", *(f"then-{i}" for i in range(29))]
    for n, name in enumerate(order):
        cache.put(k(name), Answer(same, "m", None))
        cache.flush()
        clock.now += -3600 if n == 0 else 60  # (the system clock set back an hour, once)
    kept = [name for name in order if cache.get(k(name)) is not None]
    assert kept == order[3:]  # the three oldest out, in the order they were bought
    cache.close()


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 30_000), min_size=1, max_size=40),
    bound=st.integers(5_000, 200_000),
    per_flush=st.integers(1, 5),
)
def test_property_the_bound_holds_the_newest_and_evicts_no_more_than_it_must(
    lengths: list[int], bound: int, per_flush: int
) -> None:
    clock = Clock()
    rng = random.Random(len(lengths))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / FILE
        cache = AnswerCache(Path(folder), max_gb=bound / 1e9, clock=clock)
        counts: list[int] = []  # in put order, what each answer counts for (0: too big to keep)
        before = 0  # the total after the last flush
        for i, length in enumerate(lengths):
            answer = rng.randbytes(length)
            count = int((len(pack(answer)[0]) + len("m") + store_module.ROW_BYTES) * store_module._FILL)
            counts.append(count if count <= 0.9 * bound else 0)
            cache.put(k(i), Answer(answer, "m", None))
            if i % per_flush < per_flush - 1 and i < len(lengths) - 1:
                continue
            cache.flush()
            clock.now += 60
            with sqlite3.connect(path) as db:  # (not `get`: a use would change the order)
                kept = [j for j in range(i + 1) if db.execute(_KEPT, (k(j),)).fetchone()]
            bytes_, total, rows, n = sums(path)
            assert (bytes_, rows) == (total, n)
            assert bytes_ <= bound
            if kept:  # the newest kept, the rest out (a flush's answers are alike in age)
                first = kept[0] // per_flush
                assert set(kept) >= {j for j in range(i + 1) if j // per_flush > first and counts[j]}
            came = before + sum(counts[i - i % per_flush : i + 1])
            assert bytes_ >= min(came, 0.9 * bound - max(counts))  # (no more out than it must)
            before = bytes_
        cache.close()


_KEPT = "SELECT 1 FROM answers WHERE key = ?"
