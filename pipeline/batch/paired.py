"""The twins of the batch being taken in (`pipeline.batch.twins`), answered as it is: each with
its leader's answer (reused, at what that cost: the batch price), or failed with it (the batch
halted), or set to follow its leader into the batch it goes again in, or to go itself.

Its leaders' answers are kept as the intake writes them (`written`), so that no answer is
read back; where an earlier go at the batch wrote one (a run killed before the batch was
committed taken), it is judged again from the batch's results as they are read again
(`seen`: a SIGKILL loses the answers the cache had queued); only where the batch's results
do not hold it is the answer cache asked, and a twin it cannot answer goes itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import anyio

from pipeline.account.cost import answer_cost
from pipeline.batch.again import AGAIN
from pipeline.batch.book import Batch, Book, Listed
from pipeline.batch.judge import LineJudge, answered
from pipeline.job import Request, Success
from pipeline.prices import Price

if TYPE_CHECKING:
    from pipeline.batch.keep import Keep
    from pipeline.batch.twins import Twins


class Paired:
    def __init__(
        self,
        twins: Twins | None,
        book: Book,
        judge: LineJudge,
        *,
        keep: Keep | None = None,
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        self.twins, self.book, self.judge, self.keep = twins, book, judge, keep
        self.prices = prices or {}
        self.keys: dict[str, bytes] = {}  # the batch's lines' keys, where it has twins
        self._early = 0  # how many twins it had as its intake began
        self._leading: set[str] = set()  # its lines that lead twins
        self._answers: dict[str, Success] = {}  # their answers, as written

    async def begin(self, n: int) -> None:
        """The twins listed with batch `n` and the keys of its lines, read back from its file;
        its leaders set aside, so that their answers are kept as written."""
        assert self.twins is not None
        self._early = self.twins.count(n)
        if self._early:
            await self._read(n)
            wanted = self.twins.keys(n)
            self._leading = {custom_id for custom_id, key in self.keys.items() if key in wanted}

    @property
    def leading(self) -> bool:
        """Whether the batch has lines that lead twins."""
        return bool(self._leading)

    def seen(self, batch: Batch, listed: Listed, obj: Any) -> None:
        """A result line of an id an earlier go at the batch wrote (killed before the batch
        was taken): a leader's answer is read from it again, as that go wrote it, where the
        cache may not hold it (the answers it had queued are lost with the process)."""
        if listed.custom_id in self._leading and listed.custom_id not in self._answers:
            answer = answered(batch, listed, obj, self.judge.verdict)
            if answer is not None:
                self._answers[listed.custom_id] = answer

    def written(self, successes: Sequence[Success]) -> None:
        if self._leading:
            self._answers.update(
                (s.request.custom_id, s) for s in successes if s.request.custom_id in self._leading
            )

    async def answer(
        self, batch: Batch, write: Callable[[], bool], every: int
    ) -> tuple[dict[str, list[Listed]], list[tuple[str, str, bytes]]] | None:
        """Each twin answered or failed (the judge's outcomes, written `every` so many), or
        set to go itself (returned: leader -> its twins), or to follow its leader (returned:
        twin, leader, key); None where a write failed. From here on, no twin joins the
        batch; those that joined as it was taken in find their leader's answer in the cache,
        or go themselves."""
        assert self.twins is not None
        self.twins.closing(batch.n)
        if self.twins.count(batch.n) > self._early:
            await self._read(batch.n)
        twins = self.twins.of(batch.n)
        leaders = {key: custom_id for custom_id, key in self.keys.items()}
        loose: dict[str, list[Listed]] = {}
        moves: list[tuple[str, str, bytes]] = []
        ledger, judge = self.book.ledger, self.judge
        db = ledger.reading()
        for twin, key in twins:
            if len(judge.outcomes) >= every and not write():
                return None
            if ledger.is_done(twin.custom_id):
                continue  # (answered by a go at this batch cut short)
            leader = leaders.get(key)
            if leader is None:  # (its batch's file unreadable: not sent; the next run sends it)
                judge.fail(
                    batch, twin, "unanswered", "not sent: its twin's batch file could not be read back"
                )
                continue
            answer = self._reused(twin, key, self._answers.get(leader), batch)
            if answer is not None:
                judge.outcomes.append(answer)
                continue
            row = db.execute("SELECT again FROM taking WHERE id = ?", (leader,)).fetchone()
            if row is not None and row[0] == AGAIN:
                moves.append((twin.custom_id, leader, key))
            elif judge.halted:
                judge.fail(batch, twin, "batch_cancelled", "not sent: its twin's batch was cancelled")
            else:
                loose.setdefault(leader, []).append(twin)
        return loose, moves

    async def _read(self, n: int) -> None:
        from pipeline.batch.keep import keys_of  # (the cache's modules: only where twins are)

        assert self.twins is not None
        self.keys = await anyio.to_thread.run_sync(keys_of, self.book.path(n), self.twins.scope)

    def _reused(self, twin: Listed, key: bytes, answer: Success | None, batch: Batch) -> Success | None:
        """The leader's answer as the twin's, at what it cost (the batch price); where the
        batch's results did not give it, the cache's, if it holds it."""
        request = Request(twin.custom_id, twin.line, b"", twin.metadata, batch.model)
        if answer is None:
            if self.keep is None:
                return None
            return self.keep.reuse.taken(request, key, self.judge.verdict)
        cost, _ = answer_cost(answer.reply.body, self.prices, batch.model)
        return Success(request, answer.reply, 0, answer.parsed, answer.label, True, cost)
