"""`--max-cost` at the batch tier: each batch's worst case (its lines' at the batch price, summed
as they were staged) held against the cap before it is submitted, and let go once it is taken
in, when what it really cost has been charged."""

from __future__ import annotations

import math
from collections.abc import Callable

from pipeline.account.cost import Budget, Reservation, money
from pipeline.batch.book import Batch
from pipeline.errors import RunStopped


class Holds:
    def __init__(self, budget: Budget | None, stop: Callable[[RunStopped], None]) -> None:
        self.budget = budget
        self.stop = stop
        self.held: dict[int, float] = {}  # n -> what is held for it

    def hold(self, batch: Batch, *, made: bool = False) -> bool:
        """Hold the batch's worst case against --max-cost. False when it does not fit: it
        waits for a batch running to end (what that one really cost is then known), or,
        with none running, the run stops; and when what it may cost cannot be told. `made`:
        a batch made (or maybe made) before this run, held as it was, whatever the cap."""
        budget = self.budget
        if budget is None or batch.n in self.held:
            return True
        worst = batch.reserved
        if made:
            worst = 0.0 if math.isinf(worst) else worst
        elif math.isinf(worst):
            self.stop(
                RunStopped(
                    f"cannot keep to --max-cost: nothing tells what {batch.model} costs at the batch "
                    f'tier; add [prices."{batch.model}"] prompt = ..., completion = ... (dollars per '
                    "million tokens) to the job file, then run again to resume",
                    code="budget_unpriced",
                )
            )
            return False
        elif budget.spent + budget.reserved + worst > budget.cap:
            if self.held:
                return False
            self.stop(
                RunStopped(
                    f"the budget is reached: {money(budget.spent)} spent of the {money(budget.cap)} cap, "
                    f"and batch {batch.n} may cost {money(worst)} (every run into this folder counts); "
                    "run again with a higher --max-cost to resume",
                    code="budget_reached",
                )
            )
            return False
        budget.reserved += worst
        self.held[batch.n] = worst
        return True

    def release(self, n: int) -> None:
        held = self.held.pop(n, 0.0)
        if self.budget is not None:
            self.budget.release(Reservation(held, None))
