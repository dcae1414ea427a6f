"""Taking an ended batch in: its result lines, streamed, each to exactly one of

    a result     a 200 that is a chat completion keeping the verdict: results.jsonl
    again        what the synchronous path would try again (429, 5xx, an empty or invalid
                 answer, a line the batch never ran: expired, cancelled, unanswered), staged
                 into a new batch from this batch's own file (tries + 1), while it has
                 tries left (`--max-attempts`, and the verdict's own for invalid answers)
    a failure    the rest (400...), and what has no tries left: errors.jsonl
    refused      a line for an id this batch did not hold, or a second one for the same id:
                 counted (usage.json's answers, "refused"), never written

Exactly once: the outcomes are written by the run's writer, and the batch is committed
`taken` (with the new batches of its lines to go again) only once the writer has indexed
them all. A run killed before that takes the batch in again: ids already done are skipped
silently, failures are listed again under the same key (errors.jsonl holds each once), and
the lines to go again are found again.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from pipeline.account.books import Books
from pipeline.batch.again import AGAIN, NOW, send_now, stage_again
from pipeline.batch.book import Batch, Book, Listed
from pipeline.batch.now import SendNow
from pipeline.batch.stage import Files
from pipeline.errors import InvalidOutput, RequestError
from pipeline.job import Failure, Outcome, Reply, Request, Success
from pipeline.output.ledger import Ledger
from pipeline.output.writer import Writer
from pipeline.send.batchapi import BatchApi, BatchInfo
from pipeline.send.client import check_completion
from pipeline.send.status import answer_key, http_error
from pipeline.send.verdict import Verdict

WRITE_EVERY = 512  # outcomes written at once
READ_EVERY = 512  # result lines looked up at once
CROWDED = "token_limit_exceeded"  # a batch failed for the provider's want of room
# The codes of a line a batch never ran: not the line's fault.
NEVER_RAN = frozenset({"batch_expired", "batch_cancelled", "batch_failed", "expired", "cancelled"})


class Intake:
    def __init__(
        self,
        *,
        api: BatchApi,
        book: Book,
        ledger: Ledger,
        writer: Writer,
        books: Books,
        verdict: Verdict | None,
        max_attempts: int,
        files: Callable[[], Files],
        commit: Callable[[], bool],
        say: Callable[[str], None],
        wall: Callable[[], float] = time.time,
        now: SendNow | None = None,
    ) -> None:
        self.now = now  # `--then sync`: what has no batch attempt left is sent now
        self.wall = wall  # the clock a batch's submission was dated by
        self.api, self.book, self.ledger, self.writer, self.books = api, book, ledger, writer, books
        self.verdict = verdict
        self.max_attempts = max_attempts
        self.files = files
        self.commit = commit
        self.say = say
        self.refused = 0  # result lines refused by this run
        self.crowded = False  # the batch last taken in failed for want of room, not for its lines
        self._outcomes: list[Outcome] = []
        ledger.writing().execute(
            "CREATE TEMP TABLE IF NOT EXISTS taking (id TEXT PRIMARY KEY, again INTEGER) WITHOUT ROWID"
        )

    async def take(self, batch: Batch, info: BatchInfo) -> list[int] | None:
        """Take the ended batch in; the numbers of the batches its lines go again in, or None
        when it could not be taken whole (the folder takes no more: the run stops)."""
        # What an earlier go at it wrote (its download cut short) indexed first: those ids are
        # then done, and skipped, rather than written twice; what it had not written yet is
        # let go, and met again.
        self._outcomes = []
        await self.writer.checkpoint()
        if self.writer.broken is not None:
            return None
        db = self.ledger.writing()
        db.execute("DELETE FROM taking")
        now = self.wall()
        waited = max(now - (batch.at or now), 0.0)  # from its submission: an answer's latency
        invalid = info.status == "failed" and info.counts.completed == 0 and bool(info.errors)
        # Failed for want of room at the provider (OpenAI's enqueued tokens, spent by batches
        # still running), not for its lines: they go again, once a batch running has ended.
        self.crowded = invalid and all(CROWDED in error for error in info.errors)
        invalid = invalid and not self.crowded
        if self.crowded:
            self.say(
                f"pipeline: batch {batch.n} ({info.id}) was refused for now ({info.errors[0]}); its "
                f"{batch.lines:,} lines go again once a batch running has ended"
            )
        elif invalid:
            self.say(
                f"pipeline: batch {batch.n} ({info.id}) failed validation, and its {batch.lines:,} "
                f"lines with it: {'; '.join(info.errors[:3])}"
            )
        if not (invalid or self.crowded):
            read: list[bytes] = []
            async for raw in self.api.results(info):
                read.append(raw)
                if len(read) >= READ_EVERY:
                    self._lines(batch, read, waited)
                    read = []
                    if len(self._outcomes) >= WRITE_EVERY and not self._write():
                        return None
            self._lines(batch, read, waited)
        for listed in self._unanswered(batch.n):
            if invalid:
                message = "; ".join(info.errors[:5])
                self._fail(batch, listed, "batch_invalid", f"the batch failed validation: {message}")
            else:
                self._again_or_fail(batch, listed, "unanswered", f"the batch ended {info.status} without it")
        if not self._write():
            return None
        again = await stage_again(self.book, self.ledger, batch, self.files())
        if self.now is not None and not await send_now(
            self.book, self.ledger, batch, self.now, self._write_now
        ):
            return None
        await self.writer.checkpoint()
        if self.writer.broken is not None:
            return None
        # (nothing awaited from here to the commit: a checkpoint of the writer meanwhile
        # would commit the new batches staged while this one is not taken yet)
        with self._whole():
            for n, lines, size, worst in again:
                self.book.staged(n, lines=lines, size=size, reserved=worst)
            self.book.taken(batch.n)
        if not self.commit():
            return None
        with contextlib.suppress(OSError):
            self.book.path(batch.n).unlink(missing_ok=True)
        return [n for n, *_ in again]

    async def drop(self, batch: Batch, code: str, message: str) -> bool:
        """The provider refused the batch itself: every line of it fails with `message` (not
        sent again as it is), and the batch is dropped once they are written."""
        self._outcomes = []
        self.ledger.writing().execute("DELETE FROM taking")
        for listed in self.book.lines_of(batch.n):
            if not self.ledger.is_done(listed.custom_id):
                self._fail(batch, listed, code, message)
            if len(self._outcomes) >= WRITE_EVERY and not self._write():
                return False
        if not self._write():
            return False
        await self.writer.checkpoint()
        if self.writer.broken is not None:
            return False
        with self._whole():
            self.book.dropped(batch.n)
        if not self.commit():
            return False
        with contextlib.suppress(OSError):
            self.book.path(batch.n).unlink(missing_ok=True)
        return True

    @contextlib.contextmanager
    def _whole(self) -> Iterator[None]:
        """The book's steps of one change, all or none: a step that fails (or a cancellation
        there) takes back those before it, which a later commit would have made a half of
        (new batches of a batch's lines staged, the batch not taken: paid twice)."""
        try:
            yield
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.ledger.rollback()
            raise

    # -- one line ------------------------------------------------------------------------------

    def _lines(self, batch: Batch, raws: list[bytes], waited: float) -> None:
        """A run of result lines, their ids looked up at once (three queries a run, not
        three a line)."""
        parsed: list[tuple[Any, str | None]] = []
        for raw in raws:
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                obj = None
            custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
            parsed.append((obj, custom_id if isinstance(custom_id, str) else None))
        ids = list({custom_id for _, custom_id in parsed if custom_id is not None})
        listed = self.book.listed_among(batch.n, ids)
        met = self._among("taking", ids)  # met in an earlier run of this batch's lines
        done = self._among("done", ids) if self.ledger.done_count else set()
        first: list[str] = []
        for obj, custom_id in parsed:
            one = listed.get(custom_id) if custom_id is not None else None
            if one is None or one.custom_id in met:
                self.refused += 1
                self.books.usage.answers["refused"] += 1
                continue
            met.add(one.custom_id)
            first.append(one.custom_id)
            if one.custom_id in done:
                continue  # taken in before a crash: written once already
            self._line(batch, one, obj, waited)
        self.ledger.writing().executemany("INSERT OR IGNORE INTO taking (id) VALUES (?)", zip(first))

    def _among(self, table: str, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        marks = ", ".join("?" for _ in ids)
        rows = self.ledger.reading().execute(f"SELECT id FROM {table} WHERE id IN ({marks})", ids)
        return {str(custom_id) for (custom_id,) in rows}

    def _line(self, batch: Batch, listed: Listed, obj: Any, waited: float) -> None:
        assert isinstance(obj, dict)
        response, error = obj.get("response"), obj.get("error")
        request = _request(batch, listed)
        if isinstance(response, dict) and response.get("status_code") == 200:
            body = response.get("body")
            request_id = response.get("request_id")
            try:
                checked = check_completion(body, request_id=request_id)
                # Against --max-cost, as the synchronous path charges an answer: paid, kept or
                # not (one that is no completion is charged as thrown away, below).
                self.books.billed(checked, request)
                parsed = self._judge(checked, request)
            except RequestError as e:
                self._failed_answer(batch, listed, e)
                return
            reply = Reply(checked, None, 200, request_id if isinstance(request_id, str) else None, waited)
            label = self.verdict.label(parsed) if self.verdict is not None else None
            self._outcomes.append(Success(request, reply, listed.tries, parsed, label))
            return
        if isinstance(response, dict) and isinstance(response.get("status_code"), int):
            status = response["status_code"]
            body = response.get("body")
            message = _message(body) or f"HTTP {status}"
            refusal = http_error(status, message, body=body, request_id=response.get("request_id"))
            self.books.attempt(answer_key(refusal))
            self._failed_answer(batch, listed, refusal, counted=True)
            return
        code = error.get("code") if isinstance(error, dict) else None
        message = _message({"error": error}) or "the batch did not run this line"
        if code is None or code in NEVER_RAN:
            self._again_or_fail(batch, listed, str(code or "unanswered"), message)
        else:
            self._fail(batch, listed, str(code), message)

    def _first(self, custom_id: str) -> bool:
        """Whether this is the batch's first line for the id (a second one is refused)."""
        cur = self.ledger.writing().execute("INSERT OR IGNORE INTO taking (id) VALUES (?)", (custom_id,))
        return bool(cur.rowcount)

    def _judge(self, body: dict[str, Any], request: Request) -> Any:
        if self.verdict is None:
            return None
        try:
            return self.verdict.check(body)
        except InvalidOutput as e:
            self.books.discarded(body, request)  # paid for, though no result comes of it
            e.body = body
            raise

    def _failed_answer(self, batch: Batch, listed: Listed, e: RequestError, *, counted: bool = False) -> None:
        if not counted:
            self.books.attempt(answer_key(e))
            if not isinstance(e, InvalidOutput):
                self.books.thrown_away(e.body, _request(batch, listed))
        most = self.max_attempts
        if isinstance(e, InvalidOutput) and self.verdict is not None:
            most = min(most, self.verdict.max_attempts)
        if e.transient and listed.tries < most:
            self._again(listed)
            return
        if e.transient and self.now is not None and not isinstance(e, InvalidOutput):
            self._again(listed, NOW)
            return
        self._outcomes.append(
            Failure(
                line=listed.line,
                code=e.code,
                message=_after(e.message, listed.tries),
                custom_id=listed.custom_id,
                status=e.status,
                body=e.body,
                request_id=e.request_id,
                attempts=listed.tries,
                metadata=listed.metadata,
                model=batch.model,
            )
        )

    def _again_or_fail(self, batch: Batch, listed: Listed, code: str, message: str) -> None:
        if listed.tries < self.max_attempts:
            self._again(listed)
        elif self.now is not None:
            self._again(listed, NOW)
        else:
            self._fail(batch, listed, code, _after(message, listed.tries))

    def _again(self, listed: Listed, how: int = AGAIN) -> None:
        self.ledger.writing().execute(
            "INSERT OR REPLACE INTO taking (id, again) VALUES (?, ?)", (listed.custom_id, how)
        )

    def _fail(self, batch: Batch, listed: Listed, code: str, message: str) -> None:
        self._outcomes.append(
            Failure(
                line=listed.line,
                code=code,
                message=message,
                custom_id=listed.custom_id,
                attempts=listed.tries,
                metadata=listed.metadata,
                model=batch.model,
                unsent=True,  # not the input's fault: counted as a failed request
            )
        )

    def _unanswered(self, n: int) -> list[Listed]:
        """The batch's lines it gave no line for (and not done before a crash)."""
        rows = (
            self.ledger.reading()
            .execute("SELECT id FROM batch_lines WHERE n = ? AND id NOT IN (SELECT id FROM taking)", (n,))
            .fetchall()
        )
        unanswered = []
        for (custom_id,) in rows:
            if self.ledger.is_done(custom_id):
                continue
            listed = self.book.listed(n, custom_id)
            if listed is not None:
                self._first(custom_id)
                unanswered.append(listed)
        return unanswered

    # -- writing, and going again ---------------------------------------------------------------

    def _write_now(self, outcomes: list[Outcome]) -> bool:
        self._outcomes += outcomes
        return self._write()

    def _write(self) -> bool:
        outcomes, self._outcomes = self._outcomes, []
        if not outcomes:
            return self.writer.broken is None
        successes = [o for o in outcomes if isinstance(o, Success)]
        if successes:
            self.books.answered(len(successes))
        if self.writer.broken is not None:
            return False
        try:
            self.writer.write(outcomes, successes)
        except OSError as e:
            self.writer.fail(e)
            return False
        return True


def _request(batch: Batch, listed: Listed) -> Request:
    return Request(listed.custom_id, listed.line, b"", listed.metadata, batch.model)


def _message(body: Any) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return None


def _after(message: str, tries: int) -> str:
    return f"{message} (after {tries} batch{'es' if tries != 1 else ''})"
