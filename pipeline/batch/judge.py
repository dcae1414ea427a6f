"""What one result line of a batch becomes: a result (a 200 that is a chat completion keeping
the verdict), a line to go again (what the synchronous path would try again, while it has
tries left), a failure, or refused (an id the batch did not hold, or a second line for one):
judged as the synchronous path judges an answer (`check_completion`, the verdict, the
meaning of a status), and counted in the run's books."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from pipeline.account.books import Books
from pipeline.batch.again import AGAIN, NOW
from pipeline.batch.book import Batch, Book, Listed
from pipeline.errors import InvalidOutput, RequestError
from pipeline.job import Failure, Outcome, Reply, Request, Success
from pipeline.output.ledger import Ledger
from pipeline.send.batchapi import Flaw, ResultLine
from pipeline.send.client import check_completion
from pipeline.send.status import answer_key, http_error
from pipeline.send.verdict import Verdict

# The codes of a line a batch never ran: not the line's fault.
NEVER_RAN = frozenset({"batch_expired", "batch_cancelled", "batch_failed", "expired", "cancelled"})


class LineJudge:
    def __init__(
        self,
        *,
        book: Book,
        ledger: Ledger,
        books: Books,
        verdict: Verdict | None,
        max_attempts: int,
        now: bool,
    ) -> None:
        self.book, self.ledger, self.books = book, ledger, books
        self.verdict = verdict
        self.max_attempts = max_attempts
        self.now = now  # `--then sync`: what a batch left undone is sent now, not batched again
        self.refused = 0  # result lines refused by this run
        self.strangers = 0  # of those, lines for an id their batch did not hold
        self.outcomes: list[Outcome] = []  # judged, to be written
        # The batch was cancelled while this run followed it: nothing of it goes again now.
        self.halted = False
        # Told each result line of an id written before (an earlier go at the batch, killed
        # before it was taken): a leader's answer, for its twins (`pipeline.batch.paired`).
        self.seen: Callable[[Batch, Listed, Any], None] | None = None

    def lines(self, batch: Batch, raws: list[ResultLine], waited: float) -> None:
        """A run of result lines, their ids looked up at once (one query a run, not three a
        line)."""
        parsed: list[tuple[Any, str | None]] = []
        for raw in raws:
            if isinstance(raw, dict):
                obj: Any = raw
            else:
                try:
                    obj = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    obj = None
            custom_id = obj.get("custom_id") if isinstance(obj, dict) else None
            parsed.append((obj, custom_id if isinstance(custom_id, str) else None))
        ids = list({custom_id for _, custom_id in parsed if custom_id is not None})
        # met: in an earlier run of this batch's lines
        listed, met, done = self.book.looked_up(batch.n, ids, done=bool(self.ledger.done_count))
        first: list[str] = []
        for obj, custom_id in parsed:
            one = listed.get(custom_id) if custom_id is not None else None
            if one is None or one.custom_id in met:
                self.refused += 1
                self.strangers += one is None
                self.books.usage.answers["refused"] += 1
                continue
            met.add(one.custom_id)
            first.append(one.custom_id)
            if one.custom_id in done:
                if self.seen is not None:
                    self.seen(batch, one, obj)
                continue  # taken in before a crash: written once already
            self._line(batch, one, obj, waited)
        self.ledger.writing().executemany("INSERT OR IGNORE INTO taking (id) VALUES (?)", zip(first))

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
            self.outcomes.append(Success(request, reply, listed.tries, parsed, label))
            return
        if isinstance(response, dict) and _status(response.get("status_code")):
            status = response["status_code"]
            body = response.get("body")
            message = _message(body) or f"HTTP {status}"
            refusal = http_error(status, message, body=body, request_id=response.get("request_id"))
            self.books.attempt(answer_key(refusal))
            self._failed_answer(batch, listed, refusal, counted=True)
            return
        code = _code(error.get("code")) if isinstance(error, dict) else None
        message = _message({"error": error}) or "the batch did not run this line"
        if code is None or code in NEVER_RAN:
            self.again_or_fail(batch, listed, str(code or "unanswered"), message)
        else:
            self.fail(batch, listed, str(code), message)

    def first(self, custom_id: str) -> bool:
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
        # --max-attempts and the verdict's own bound count every try the line was sent in,
        # batch and request alike: one with none left fails, `--then sync` or not (a request
        # sent now starts from those spent, `SentNow.spent`).
        most = self.max_attempts
        verdict = self.verdict if isinstance(e, InvalidOutput) else None
        if verdict is not None:
            most = min(most, verdict.max_attempts)
        if e.transient and not self.halted and listed.tries < most:
            # (`--then sync`: sent now, at once, where it would wait a new batch's day; the book
            # keeps no count of a line's broken answers: each batch's, counted so)
            broke = listed.tries if verdict is not None and self.now else 0
            self._again(listed, NOW if self.now else AGAIN, spent=listed.tries, broke=broke)
            return
        self.outcomes.append(
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

    def again_or_fail(self, batch: Batch, listed: Listed, code: str, message: str) -> None:
        """A line the batch never ran (expired, cancelled, unanswered, or kept from running by
        other lines' flaws): again, while it has tries left. `--then sync` sends it now, at
        once, where it would wait a new batch: this batch spent none of its tries (nothing was
        paid), the batches before it did."""
        if self.halted:
            self.fail(batch, listed, code, message)
        elif self.now and listed.tries - 1 < self.max_attempts:
            self._again(listed, NOW, spent=listed.tries - 1)
        elif not self.now and listed.tries < self.max_attempts:
            self._again(listed, AGAIN, spent=listed.tries)
        else:
            self.fail(batch, listed, code, _after(message, listed.tries))

    def held(self, batch: Batch, listed: Listed, message: str) -> None:
        """A line the batch never ran for a few other lines' flaws (`pipeline.batch.flawed`):
        no fault of its own nor of the batch's time, so this batch spent none of its tries:
        it goes again as it came, in a new batch or, `--then sync`, now. Bounded all the same:
        every such batch fails the lines it names, so fewer go again each time."""
        if self.halted:
            self.fail(batch, listed, "batch_invalid", message)
        else:
            self._again(listed, NOW if self.now else AGAIN, spent=listed.tries - 1)

    def _again(self, listed: Listed, how: int, *, spent: int, broke: int = 0) -> None:
        """`spent`: the tries the line has spent so far (a new batch lists it at one more, a
        request sent now counts on from them); `broke`: of those, answers that broke the
        verdict."""
        self.ledger.writing().execute(
            "INSERT OR REPLACE INTO taking (id, again, spent, broke) VALUES (?, ?, ?, ?)",
            (listed.custom_id, how, spent, broke),
        )

    def fail(self, batch: Batch, listed: Listed, code: str, message: str) -> None:
        self.outcomes.append(
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

    def flawed(self, batch: Batch, listed: Listed, flaws: list[Flaw]) -> None:
        """A line the batch's validation named (`pipeline.batch.flawed`): failed with its own
        error, as the provider said it (its code, message and param)."""
        first = flaws[0]
        message = "; ".join(dict.fromkeys(flaw.message for flaw in flaws))
        self.outcomes.append(
            Failure(
                line=listed.line,
                code=first.code or "batch_invalid",
                message=f"{message} (the batch failed validation at this line, {first.line} of its file)",
                custom_id=listed.custom_id,
                attempts=listed.tries,
                metadata=listed.metadata,
                model=batch.model,
                extra={"param": first.param},
                unsent=True,  # never run: not the input's fault as the reader tells it
            )
        )


def _code(value: Any) -> str | None:
    """A result line's error code as text: a provider's own kind (a number, an object) kept
    as it said it, as far as it can be said."""
    if value is None or isinstance(value, str):
        return value
    try:
        return orjson.dumps(value).decode()[:200]
    except orjson.JSONEncodeError:  # (nested past what can be written back)
        return "unknown"


def _status(value: Any) -> bool:
    """Whether a result line's status_code is an HTTP status (not a flag, not a count)."""
    return isinstance(value, int) and not isinstance(value, bool) and 100 <= value <= 599


def answered(batch: Batch, listed: Listed, obj: Any, verdict: Verdict | None) -> Success | None:
    """The line's answer as a result (a 200 that is a chat completion keeping the verdict),
    judged as `LineJudge` judges it, nothing counted; None where it is no such answer."""
    response = obj.get("response") if isinstance(obj, dict) else None
    if not isinstance(response, dict) or response.get("status_code") != 200:
        return None
    request_id = response.get("request_id")
    try:
        checked = check_completion(response.get("body"), request_id=request_id)
        parsed = None if verdict is None else verdict.check(checked)
    except RequestError:
        return None
    reply = Reply(checked, None, 200, request_id if isinstance(request_id, str) else None, 0.0)
    label = verdict.label(parsed) if verdict is not None else None
    return Success(_request(batch, listed), reply, listed.tries, parsed, label)


def _request(batch: Batch, listed: Listed) -> Request:
    return Request(listed.custom_id, listed.line, b"", listed.metadata, batch.model)


def _message(body: Any) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    return None


def _after(message: str, tries: int) -> str:
    return f"{message} (after {tries} batch{'es' if tries != 1 else ''})"
