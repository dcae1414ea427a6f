"""A limit belongs to a scope: the account, or one model (OpenRouter's `:free` models allow 20
requests a minute on a key whose paid ones have no such cap).

A `Scope` is a pace and the rate finder that reads its limit from its own send order; the
account's and a model's are of one kind. A request passes its `chain`: its model's scope where
it has one, then the account's (`gate`). A model's scope is **given** (`[limits."vendor/model"]`,
paced from the start) or **found** (`Scopes.refused`): its requests refused four in a row, in
send order, while other models' sent among them went through. Its finder then reads the limit
from the model's requests alone, moved there from the account's send log, and an account pace
read at such models' refusals alone is forgotten. A model that lets nothing through for
--give-up-after is **given up**, not the run: its lines fail unsent and the others go on. A
scope's pace lives where the account's does: here, or in the shared store (the account's key
and a hash of the model).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pipeline.errors import RunStopped
from pipeline.pace.finder import RUN, RateFinder
from pipeline.pace.pacer import Pacer
from pipeline.pace.sendlog import SIZE
from pipeline.pace.stated import MARGIN, per_second
from pipeline.quote import quote

if TYPE_CHECKING:
    from pipeline.jobfile import ModelLimit
    from pipeline.pace.gate import Slot

THROUGH = 2  # requests of other models that went through among one model's run of refusals
# A model's send log: four times --concurrency (it must outlast what is in flight), at least
# this; not the account's SIZE: hundreds of `:free` models would hold half a megabyte each.
SCOPE_LOG = 2048
# Requests waiting for a model's pace, at least, before a worker sets the next aside (a
# second of its pace, when that is more): enough to keep its pace busy, and no more.
WAITING = 4

# The pace of a scope (a model, or None: the account) at its rates given, a second.
PacerFor = Callable[[str | None, float | None, float | None], Pacer]
Start = Callable[[Callable[[], Coroutine[Any, Any, None]]], object]


@dataclass(eq=False, slots=True)
class Scope:
    model: str | None  # None: the account
    pacer: Pacer
    finder: RateFinder  # its limit, read from its own send order (`finder.log`)
    chain: tuple[Scope, ...] = ()  # the scopes its requests pass: itself, then the account's
    waiting: int = 0  # requests waiting for its pace now
    given_up: str = ""  # why its requests are sent no more this run
    # The account's tickets of its model's requests sent before it was made: theirs here.
    moved: dict[int, int] = field(default_factory=dict)


def _scope(model: str | None, finder: RateFinder, account: Scope | None = None) -> Scope:
    scope = Scope(model, finder.pacer, finder)
    scope.chain = (scope,) if account is None else (scope, account)
    return scope


def pace_of(finder: RateFinder) -> tuple[float | None, str | None, float | None]:
    """A scope's pace in force (requests a second), whence (given, stated or found), and the
    limit it keeps under."""
    rate = finder.pacer.request_rate
    if not rate:
        return None, None, None
    if finder.ceiling is not None:
        return rate, "given" if finder.rpm_given else "stated", finder.ceiling / MARGIN
    return rate, "found", finder.limit


class Tags(dict[str, int]):
    """A number for each model, from 1 in the order they are first seen (0: no model)."""

    def __missing__(self, model: str) -> int:
        tag = self[model] = len(self) + 1
        return tag


class Scopes:
    """The account's scope and the models', and which a refusal is."""

    def __init__(
        self,
        account: RateFinder,
        *,
        limits: Mapping[str, ModelLimit] = MappingProxyType({}),
        pacer_for: PacerFor = lambda model, rate, tokens: Pacer(request_rate=rate, token_rate=tokens),
    ) -> None:
        self.account = _scope(None, account)
        assert account.window is not None
        self.window = account.window  # the one a request enters: in flight is bounded once
        self.by_model: dict[str, Scope] = {}
        self.made = 0  # model scopes made: a request that entered before the last looks again
        self.tags = Tags()  # a number for each model seen, for the send log
        self._blame: set[int] = set()  # the models at whose refusals the account's pace was read
        self._pacer_for = pacer_for
        self._start: Start | None = None
        for model, limit in limits.items():
            self._add(model, per_second(limit.rpm), per_second(limit.tpm))

    def all(self) -> tuple[Scope, ...]:
        return (self.account, *self.by_model.values())

    def _add(self, model: str, request_rate: float | None, token_rate: float | None) -> Scope:
        account, ceiling = self.account.finder, self.window.ceiling
        finder = RateFinder(
            self._pacer_for(model, request_rate, token_rate),
            None,  # no window: in flight is the account's to bound (`Gate.enter`)
            ceiling=request_rate,
            tpm_given=token_rate is not None,
            give_up=account.outage.give_up,
            stop=lambda stopped: self._give_up(model, stopped),
            clock=account.clock,
            log_size=min(SIZE, max(SCOPE_LOG, 1 << (4 * ceiling - 1).bit_length())),
        )
        finder.outage.model = model
        scope = self.by_model[model] = _scope(model, finder, self.account)
        self.made += 1
        if self._start is not None:
            self._start(scope.pacer.run)
        return scope

    def _give_up(self, model: str, stopped: RunStopped) -> None:
        """`model` lets nothing through for long: its lines are left for the next run, its
        waiters told at once; the run goes on with the others. (Told once: its `Outage`.)"""
        scope = self.by_model[model]
        scope.given_up = str(stopped)
        self._say(
            f"pipeline: {scope.given_up}; its lines fail unsent (the next run tries them again), "
            "and the other models' go on"
        )
        scope.pacer.wake_all()

    def _say(self, text: str) -> None:
        if (say := self.account.finder.outage.say) is not None:
            say(text)

    def start(self, start: Start) -> None:
        """Run each scope's pace, now and when made, with `start` (a task group's)."""
        self._start = start
        for scope in self.all():
            start(scope.pacer.run)

    async def check(self) -> None:
        for scope in self.all():
            await scope.pacer.check()

    def refused(self, slot: Slot, wait: float | None, message: str) -> None:
        """The server refused the attempt in `slot`: its first scope reads the refusal, the
        others note it as not let through. Where its model has no scope, among other models'
        requests, the send order tells which reads it (`_reader`)."""
        ticket, model = slot.tickets[-1], slot.model
        reader: Scope | None = slot.scopes[0]
        if len(slot.scopes) == 1 and model is not None and len(self.tags) > 1:
            reader = self._reader(ticket, model)
            slot.catch_up()  # the refusal may have given its model a scope
        for scope, mine in zip(slot.scopes, slot.tickets, strict=False):
            if scope is not reader:
                scope.finder.log.refuse(mine)
                if scope.finder.account is not None:  # answered: its shared log has it out no longer
                    scope.finder.account.account_log.answered(scope.finder.log.sent_at(mine))
                continue
            cuts = scope.finder.cuts
            scope.finder.pushback(mine, wait, message)
            if scope is self.account and scope.finder.cuts != cuts:
                # Each model in that run of refusals (its own among them), without a pace of its
                # own, shares the blame.
                scoped = {self.tags[name] for name in self.by_model if name in self.tags}
                self._blame |= scope.finder.log.tags(*scope.finder.log.run(ticket)) - scoped

    def _reader(self, ticket: int, model: str) -> Scope | None:
        """A new scope for `model`, when it is refused while the others go through; else the
        account's, or none."""
        tag = self.tags[model]
        log = self.account.finder.log
        run, between, around = log.run_of(ticket, tag)
        if run < RUN or between < THROUGH:
            # Alone among others that went through: one model's limit, maybe, not yet a run of
            # it (or an upstream's scattered refusal); not the account's. Beside another
            # refusal it may be, when nothing of its model got through between them (a full
            # account refuses all); beside other models' refusals alone not: many `:free`
            # models, each limited on its own, are refused side by side.
            first, last = log.run(ticket)
            return self.account if not around or (last > first and run > 1 and between < THROUGH) else None
        scope = self._add(model, None, None)
        scope.moved = log.move(tag, scope.finder.log)
        # Once every model whose refusals the account's pace was read at has a pace of its
        # own, that pace was theirs (several `:free` models' retries, coming back together,
        # make runs of refusals in the account's send order that none makes alone).
        self._blame.discard(tag)
        if not self._blame:
            self.account.finder.forget()
        self._say(
            f"pipeline: {quote(model)} is refused while other models' requests go through: it is paced "
            "on its own from now on, at a limit found from its requests alone"
        )
        return scope

    def crowded(self, model: str | None) -> bool:
        """Whether enough requests of `model` wait for its scope's pace: a worker takes the
        next request instead, so that one slow model does not hold every worker."""
        scope = self.by_model.get(model) if model is not None and self.by_model else None
        if scope is None:
            return False
        # Never more than a quarter of --concurrency: workers, too, are for the other models.
        most = min(max(WAITING, scope.pacer.request_rate or 0.0), self.window.ceiling / 4)
        return scope.waiting >= max(most, 1)

    def paces(self) -> dict[str, tuple[float | None, str | None, float | None]]:
        return {model: pace_of(scope.finder) for model, scope in self.by_model.items()}

    def wake_all(self) -> None:
        for scope in self.all():
            scope.pacer.wake_all()
