"""`--then sync`: the lines a batch left undone are sent now, through the synchronous path's
own attempts (pace, send, judge, account, retry), rather than in a new batch, their attempts
counted on from the tries their batches spent (`SentNow.spent`: `--max-attempts` bounds them
all; a line with none left is failed by the judge, not sent). Their outcomes are written with
the batch they came from, which is taken only once they all are: a run stopped while they go
takes that batch in again, and sends again only what is not done."""

from __future__ import annotations

import anyio

from pipeline.job import Outcome, Request
from pipeline.send.attempts import Attempts


class SendNow:
    def __init__(self, attempts: Attempts, *, concurrency: int) -> None:
        self.attempts = attempts
        self.concurrency = concurrency

    async def send(self, requests: list[Request]) -> list[Outcome] | None:
        """Every request's outcome; None when the run stopped before one had its outcome."""
        outcomes: list[Outcome] = []
        abandoned = False
        waiting = iter(requests)

        async def work() -> None:
            nonlocal abandoned
            for request in waiting:  # (one iterator shared: each request taken once)
                outcome = await self.attempts.process(request)
                if outcome is None:
                    abandoned = True
                else:
                    outcomes.append(outcome)

        async with anyio.create_task_group() as tg:
            for _ in range(min(self.concurrency, len(requests))):
                tg.start_soon(work)
        return None if abandoned else outcomes
