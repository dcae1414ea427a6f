"""The batch book: what it says after a commit, a rollback and a reopening of the ledger."""

from __future__ import annotations

from pathlib import Path

from pipeline.batch.book import CREATING, LIVE, RUNNING, STAGED, TAKEN, Book
from pipeline.output.ledger import Ledger


def test_a_batch_moves_through_its_states_and_only_commits_stay(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    book = Book(ledger, tmp_path)
    n = book.open("m")
    book.list_lines(n, [("a", 1, 1, {"k": 1}), ("b", 2, 1, None)])
    assert not book.follow_live()  # filling is not live: a killed run stages it again
    assert not book.followed("a")
    book.staged(n, lines=2, size=100)
    book.creating(n, 12.5)
    ledger.commit()
    book.running(n, "batch_1", {"status": "validating"})
    ledger.rollback()  # the id never committed: the book says creating, as the provider may
    tag = book.tag(n)
    ledger.close()

    ledger = Ledger(tmp_path / "ledger.sqlite")
    book = Book(ledger, tmp_path)
    assert book.tag(n) == tag  # the same folder tags alike on every run
    (batch,) = book.batches(*LIVE)
    assert (batch.state, batch.at, batch.batch_id) == (CREATING, 12.5, None)
    assert book.follow_live()  # the run that begins now takes "a" in: it never stages it again
    assert book.followed("a")
    assert not book.followed("c")
    assert book.listed(n, "a") == ("a", 1, 1, {"k": 1})
    assert [line.custom_id for line in book.lines_of(n)] == ["a", "b"]
    book.running(n, "batch_1", {"status": "in_progress"})
    book.taken(n)
    ledger.commit()
    assert book.batch(n).state == TAKEN
    assert not book.follow_live()  # nothing live for the next run to set aside
    assert not book.followed("a")
    assert book.listed(n, "a") is None
    assert book.open("m") == n + 1
    assert {STAGED, RUNNING} <= set(LIVE)
    ledger.close()


def test_batches_left_filling_are_forgotten(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.sqlite")
    book = Book(ledger, tmp_path)
    n = book.open("m")
    book.list_lines(n, [("a", 1, 1, None)])
    ledger.commit()
    assert book.forget_filling() == [n]
    ledger.commit()
    assert book.listed(n, "a") is None
    assert book.batches("filling") == []
    ledger.close()
