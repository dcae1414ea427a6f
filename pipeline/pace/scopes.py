"""A limit belongs to a scope: the account, or one model.

OpenRouter limits models separately (its `:free` models allow 20 requests a minute, its paid
ones have no such cap), and a job's lines may name any model. So every request passes its
account's pace, and its model's too when that model has one of its own; a refusal counts
against the model its request named:

- **Given.** `[limits."vendor/model"]` in the job file: the model's scope from the start,
  paced at its rpm and tpm as `--rpm`/`--tpm` pace the account.
- **Found.** A model whose requests are refused in a run (four in a row, in the order its own
  requests left) while requests of other models sent among them went through has a limit of
  its own. It gets a scope, whose rate finder reads that limit as the account's reads one
  (`pipeline.pace.finder`), from the model's requests alone, moved there from the account's
  send log. If the account's pace was read from that model's refusals alone, it is
  forgotten: the other models are not held to one model's limit.
- A refusal of a model with a scope is its scope's to read; the account's send log notes it
  as not let through, and nothing more.
- A model that lets nothing through for --give-up-after (or asks to wait longer) is given
  up, not the run: its lines fail unsent, to be tried again by the next run, and the other
  models' go on (`refusing`).

Each scope's pace has its home where the account's has it: in this process, or in the store
the account's processes share (a key of its own: the account's, and a hash of the model).
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from pipeline.errors import RunStopped
from pipeline.pace.finder import RUN, RateFinder
from pipeline.pace.local import Pacer
from pipeline.pace.sendlog import SIZE
from pipeline.pace.stated import MARGIN
from pipeline.pace.tokens import TokenCount
from pipeline.pace.window import Window
from pipeline.quote import quote

if TYPE_CHECKING:
    from pipeline.settings import ModelLimit

THROUGH = 2  # requests of other models that went through among one model's run of refusals
# A model's send log: four times --concurrency (it must outlast what is in flight) and no
# less than this, where the account's holds SIZE: a job of hundreds of `:free` models, each
# with a scope, held over half a megabyte for each.
SCOPE_LOG = 2048
# Requests waiting for a scope's pace, at least, before a worker sets the next aside (a
# second of its pace, when that is more): enough to keep its pace busy, and no more.
WAITING = 4

# The pace of a scope (a model, or None: the account) at its rates given, a second.
PacerFor = Callable[[str | None, float | None, float | None], Pacer]
Start = Callable[[Callable[[], Coroutine[Any, Any, None]]], object]


def _local(model: str | None, request_rate: float | None, token_rate: float | None) -> Pacer:
    return Pacer(request_rate=request_rate, token_rate=token_rate)


@dataclass(eq=False, slots=True)
class Scope:
    model: str
    pacer: Pacer
    finder: RateFinder
    tokens: TokenCount  # what the server counts of its requests' tokens
    waiting: int = 0  # requests waiting for its pace now
    # The account's tickets of its requests from before it had a scope: their tickets here.
    moved: dict[int, int] = field(default_factory=dict)


def pace_of(finder: RateFinder) -> tuple[float | None, str | None, float | None]:
    """A scope's pace in force (requests a second), where it comes from (given, stated by the
    server, or found), and the limit it keeps under."""
    rate = finder.pacer.request_rate
    if not rate:
        return None, None, None
    if finder.ceiling is not None:
        return rate, "given" if finder.stated.rpm_given else "stated", finder.ceiling / MARGIN
    return rate, "found", finder.limit


class Scopes:
    """The models' scopes beside the account's, and what tells a model's limit from it."""

    def __init__(
        self,
        account: RateFinder,
        *,
        limits: Mapping[str, ModelLimit] = MappingProxyType({}),
        pacer_for: PacerFor = _local,
    ) -> None:
        self.account = account
        self.by_model: dict[str, Scope] = {}
        self.tags: dict[str, int] = {}  # a number for each model seen, for the send log
        # Models given up for this run (they let nothing through for long): what was said.
        self.refusing: dict[str, str] = {}
        self._blame: set[int] = set()  # the models at whose refusals the account's pace was read
        self._pacer_for = pacer_for
        self._start: Start | None = None
        for model, limit in limits.items():
            self._add(model, _per_second(limit.rpm), _per_second(limit.tpm))

    def tag(self, model: str | None) -> int:
        if model is None:
            return 0
        tag = self.tags.get(model)
        if tag is None:
            tag = self.tags[model] = len(self.tags) + 1
        return tag

    def _add(self, model: str, request_rate: float | None, token_rate: float | None) -> Scope:
        account = self.account
        pacer = self._pacer_for(model, request_rate, token_rate)
        finder = RateFinder(
            pacer,
            # Its own, never entered: in flight is the account's to bound (`Gate.enter`).
            Window(account.window.ceiling),
            ceiling=request_rate,
            tpm_given=token_rate is not None,
            give_up=account.giving.give_up,
            stop=lambda stopped: self._give_up(model, stopped),
            clock=account.clock,
            log_size=min(SIZE, max(SCOPE_LOG, 1 << (4 * int(account.window.ceiling) - 1).bit_length())),
        )
        if request_rate or token_rate:
            finder.window.open()
        # A shared pace does not probe how tokens are counted (`Gate`: each process would pay).
        scope = self.by_model[model] = Scope(model, pacer, finder, TokenCount(probe=not pacer.shared))
        if self._start is not None:
            self._start(pacer.run)
        return scope

    def _give_up(self, model: str, stopped: RunStopped) -> None:
        """`model` lets nothing through for long: its lines are left for the next run, and
        whatever waits for its pace finds out at once; the run goes on with the others."""
        if model in self.refusing:
            return
        said = str(stopped).replace(
            "the server refuses every request", f"the server refuses every request for {model}"
        )
        said = said.removesuffix("; run the same command again then to resume")  # the run goes on
        self.refusing[model] = said
        say = self.account.outage.say
        if say is not None:
            say(
                f"pipeline: {said}; its lines fail unsent (the next run tries them again), and the other models' go on"
            )
        self.by_model[model].pacer.wake_all()

    def start(self, start: Start) -> None:
        """Run each scope's pace (a shared one keeps in step with its store) with `start`, a
        task group's, from now on."""
        self._start = start
        for scope in self.by_model.values():
            start(scope.pacer.run)

    async def check(self) -> None:
        for scope in self.by_model.values():
            await scope.pacer.check()

    def refused(self, ticket: int, model: str) -> Scope | bool:
        """The account's request `ticket`, of `model`, which has no scope, was refused: the
        model's new scope if that refusal says the limit is the model's own; else whether it
        is the account's to read (no other model's request went through around it)."""
        if len(self.tags) < 2:
            return True  # one model: its limit and the account's are one
        tag = self.tags[model]
        log = self.account.log
        run, between, around = log.run_of(ticket, tag)
        if run < RUN or between < THROUGH:
            # Alone among others that went through (in the account's send order too): one
            # model's limit, maybe, not yet a run of it (or an upstream's scattered refusal);
            # either way not the account's to react to. Beside another refusal, it may be,
            # when its model's own last requests were refused with nothing let through
            # between them: an account that is full refuses them all. Beside other models'
            # refusals alone it is not: many `:free` models, each limited on its own, each
            # with a few lines, are refused side by side while the paid model's go through.
            first, last = log.run(ticket)
            return not around or (last > first and run > 1 and between < THROUGH)
        scope = self._add(model, None, None)
        scope.moved = log.move(tag, scope.finder.log)
        # Once every model whose refusals the account's pace was read at has a pace of its
        # own, that pace was theirs: several `:free` models' retries, coming back together,
        # make runs of refusals in the account's send order that no one of them makes alone.
        self._blame.discard(tag)
        if not self._blame:
            self.account.forget()
        say = self.account.outage.say
        if say is not None:
            say(
                f"pipeline: {quote(model)} is refused while other models' requests go through: it is paced "
                "on its own from now on, at a limit found from its requests alone"
            )
        return scope

    def blame(self, ticket: int, model: str | None) -> None:
        """The account's pace was changed at the refusal of its request `ticket`, of `model`:
        each model in that run of refusals (those without a pace of their own) shares the
        blame."""
        log = self.account.log
        scoped = {self.tags[model] for model in self.by_model if model in self.tags}
        self._blame |= (log.tags(*log.run(ticket)) | {self.tag(model)}) - scoped

    def crowded(self, model: str | None) -> bool:
        """Whether enough requests of `model` wait for its scope's pace: a worker takes the
        next request instead, so that one slow model does not hold every worker."""
        scope = self.by_model.get(model) if model is not None and self.by_model else None
        if scope is None:
            return False
        # Never more than a quarter of --concurrency: workers, too, are for the other models.
        most = min(max(WAITING, scope.pacer.request_rate or 0.0), self.account.window.ceiling / 4)
        return scope.waiting >= max(most, 1)

    def paces(self) -> dict[str, tuple[float | None, str | None, float | None]]:
        """Each model scope's pace (`pace_of`), by model."""
        return {model: pace_of(scope.finder) for model, scope in self.by_model.items()}

    def wake_all(self) -> None:
        for scope in self.by_model.values():
            scope.pacer.wake_all()


def _per_second(per_minute: float | None) -> float | None:
    """A limit given per minute, paced a little under (as `--rpm` is: `runner`)."""
    return per_minute / 60 * MARGIN if per_minute else None
