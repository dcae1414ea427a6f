"""The run's books: every count of what was used and spent, kept in one place.

Three parties tell the books what happened, each at its own moment:

- the worker, as answers arrive: every attempt by its answer ("200", "429", "timeout"), and
  every answer the server will bill, against the budget (a run that cannot keep to its cap
  must stop before the next request, not when the result is written);
- the writer, once a result or a failure is in the files: the usage totals that usage.json
  reports count exactly what the files hold, so a crash never leaves them counting more;
- the repair after a crash, for result lines the index had not seen.

A result the server did not cost is costed here from the job's price table, whoever reports it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pipeline.account.cost import Budget, Reservation, answer_cost, cache_figures, money, price_for, priced
from pipeline.account.usage import Counted, Usage, reports_usage
from pipeline.errors import RunStopped
from pipeline.job import Failure, Request, SentNow, Success
from pipeline.prices import Price


class Books:
    def __init__(
        self,
        usage: Usage,
        prices: Mapping[str, Price],
        redact: Callable[[str], str] = str,
        now_prices: Mapping[str, Price] | None = None,
    ) -> None:
        self.usage = usage
        self.prices = prices  # the run's tier's
        # At the batch tier, what the lines sent now (`SentNow`: --then sync) were bought at.
        self.now_prices = now_prices
        self.redact = redact  # the API key out of what is kept (a failure's message, as echoed)
        self.budget: Budget | None = None

    def open_budget(self, max_cost: float | None) -> None:
        """Hold the run to `max_cost`, counting what every earlier run into the folder spent."""
        self.budget = Budget(max_cost, self.usage, self.prices) if max_cost else None

    # -- the worker, as answers arrive --------------------------------------------------------

    def started(self) -> None:
        """An attempt leaves (the timeline counts them: what was started when)."""
        self.usage.timeline.started()

    def attempt(self, answer: str) -> None:
        """One attempt ended with `answer`: a status or an error code (an answer kept, "200",
        is counted by `answered`, with the others of its batch)."""
        self.usage.answer(answer)
        self.usage.timeline.answer(answer)

    async def reserve(self, request: Request) -> Reservation | RunStopped | None:
        """Hold the request's worst cost against the cap; a `RunStopped` when it does not
        fit, None when there is no cap."""
        if self.budget is None:
            return None
        reservation = await self.budget.reserve(request, self._prices_of(request))
        return self._budget_reached() if reservation is None else reservation

    def release(self, reservation: Reservation | None) -> None:
        if self.budget is not None and reservation is not None:
            self.budget.release(reservation)

    def covers_another_answer(self) -> RunStopped | None:
        """Before trying again a request whose billed answer was thrown away: does the cap
        still hold if it is paid for once more?"""
        if self.budget is None or self.budget.covers_another_answer():
            return None
        return self._budget_reached()

    def billed(self, body: dict[str, Any], request: Request) -> RunStopped | None:
        """An answer the server will bill, counted against the cap; a `RunStopped` when its
        cost cannot be told, so that the cap cannot be kept."""
        if (
            self.budget is None
            or self.budget.charge(body, request.model, self._prices_of(request)) is not None
        ):
            return None
        model = body.get("model") or request.model
        return RunStopped(
            f"cannot keep to --max-cost: the server reports no cost for {model} and the job "
            f'has no price for it; add [prices."{model}"] prompt = ..., completion = ... '
            "(dollars per million tokens) to the job file, then run again to resume",
            code="budget_unpriced",
        )

    def image(self, read: int, sent: int) -> None:
        """A local image read (`read` bytes on disk) and sent (`sent` bytes, before base64)."""
        usage = self.usage
        usage.images += 1
        usage.image_bytes_read += read
        usage.image_bytes_sent += sent

    def discarded(self, body: dict[str, Any], request: Request) -> None:
        """An answer paid for but not kept (a verdict that broke the job's schema)."""
        self._price(self.usage.add_discarded(body, request.model), body, request.model)

    def thrown_away(self, body: Any, request: Request) -> RunStopped | None:
        """An attempt that ended in an error whose body reports usage (an empty answer, a
        malformed one, an error inside a 200): billed though not kept, so counted as spent
        and held to the cap; a `RunStopped` as `billed` says."""
        if not reports_usage(body):
            return None
        self.discarded(body, request)
        return self.billed(body, request)

    # -- the writer, once an outcome is in the files -----------------------------------------

    def answered(self, results: int) -> None:
        """Results the writer took (one batch's, written or not): each the attempt answered
        "200" that made it, counted here for the batch rather than by each worker as the
        answer arrived (every one reaches the writer: a worker's send of a result is shielded)."""
        self.usage.answer("200", results)
        self.usage.timeline.answer("200", results)

    def kept(self, successes: Sequence[Success]) -> None:
        """Results now in the files (one write's): counted, costed, and put on the timeline
        at the moment of the write, in one look at its clock."""
        usage = self.usage
        tokens_in = tokens_out = 0
        costs: list[float] = []  # (in the order of the results: the timeline adds them so)
        now = self.now_prices
        sent: Sequence[Success] = successes
        if any(success.reused for success in successes):
            sent = [success for success in successes if not success.reused]
            self._reused([success for success in successes if success.reused])
        for success in sent:
            request = success.request
            body, model = success.reply.body, request.model
            name, reported, prompt, completion, cached, written = usage.add_body(body, model)
            prices = now if now is not None and type(request) is SentNow else None
            if reported is not None:
                cost: float | None = reported
            else:  # (priced from the tokens just counted: `answer_cost` would read them again)
                table = self.prices if prices is None else prices
                price = price_for(table, name) or price_for(table, model)
                cost = None if price is None else priced(price, prompt, completion, cached, written)
                if cost is not None:
                    usage.add_priced(name, cost)
            if cached or written:
                self._cache(name, model, cached, written, prices)
            tokens_in += prompt
            tokens_out += completion
            if cost:
                costs.append(cost)
            if success.label is not None:
                usage.verdicts[success.label] += 1
        latencies, firsts = usage.add_times(sent)
        usage.timeline.kept(tokens_in, tokens_out, costs, latencies, firsts)

    def _reused(self, successes: Sequence[Success]) -> None:
        """Results taken from the answer cache (or another request's in flight): done, not
        paid; counted apart, with the dollars they cost when bought (as the cache kept them:
        an answer a batch bought at half price is not said to save the synchronous price),
        else at the job's prices, and no tokens, latency or spending of this run."""
        usage = self.usage
        usage.outcomes["succeeded"] += len(successes)
        for success in successes:
            request = success.request
            self._reuse_cost(success.reply.body, request.model, success.bought, self._prices_of(request))
            if success.label is not None:
                usage.verdicts[success.label] += 1

    def failed(self, failure: Failure) -> None:
        self.usage.add_failure(failure, self.redact(failure.message))

    # -- the repair, for result lines the index had not seen ---------------------------------

    def recovered(self, body: dict[str, Any], *, count_outcome: bool) -> None:
        self._price(self.usage.add_body(body), body, None)
        if count_outcome:
            self.usage.outcomes["succeeded"] += 1

    def recovered_reused(
        self, body: dict[str, Any], *, count_outcome: bool, bought: float | None = None
    ) -> None:
        """A result line marked reused: counted as reused, not as paid, at what it cost when
        bought (the line's `cost_not_spent`), else at the prices of the run that wrote it."""
        self._reuse_cost(body, None, bought)
        if count_outcome:
            self.usage.outcomes["succeeded"] += 1

    def _reuse_cost(
        self,
        body: dict[str, Any],
        requested: str | None,
        bought: float | None = None,
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        usage = self.usage
        usage.reused += 1
        cost = bought if bought is not None else answer_cost(body, prices or self.prices, requested)[0]
        if cost is not None:
            usage.reused_cost += cost
        else:
            usage.reused_unpriced += 1

    def _price(self, counted: Counted, body: dict[str, Any], requested: str | None) -> None:
        """An answer just counted: cost it from the price table where the server did not."""
        name, reported, prompt, completion, cached, written = counted
        cost = reported if reported is not None else self._priced(name, body, requested)
        if cached or written:
            self._cache(name, requested, cached, written)
        self.usage.timeline.spent(prompt, completion, cost)

    def _cache(
        self,
        name: str,
        requested: str | None,
        cached: int,
        written: int,
        prices: Mapping[str, Price] | None = None,
    ) -> None:
        """An answer that read from or wrote to the provider's prompt cache: what that saved,
        and what its writes cost above the prompt price, by the price table (the server's
        cost, where it states one, holds them already: the table tells them apart)."""
        table = self.prices if prices is None else prices
        price = price_for(table, name) or price_for(table, requested)
        saved, extra = cache_figures(price, cached, written) if price is not None else (None, None)
        self.usage.add_cache(name, saved if cached else 0.0, extra if written else 0.0)

    def _prices_of(self, request: Request) -> Mapping[str, Price]:
        now = self.now_prices
        return now if now is not None and type(request) is SentNow else self.prices

    def _priced(
        self,
        name: str,
        body: dict[str, Any],
        requested: str | None,
        prices: Mapping[str, Price] | None = None,
    ) -> float | None:
        """The cost of an answer the server did not cost, from the price table (counted under
        `name`); None when the table has no price for it."""
        cost, source = answer_cost(body, self.prices if prices is None else prices, requested)
        if cost is None or source != "price table":
            return None
        self.usage.add_priced(name, cost)
        return cost

    def _budget_reached(self) -> RunStopped:
        assert self.budget is not None
        return RunStopped(
            f"the budget is reached: {money(self.budget.spent)} spent of the "
            f"{money(self.budget.cap)} cap (every run into this folder counts); run again with "
            "a higher --max-cost to resume",
            code="budget_reached",
        )
