"""The pace's one face to the worker: a request waits at the gate for its scopes' start times
and a slot in flight, and tells the gate how its attempt ended, so that its scopes learn.

    slot = await gate.enter(tokens, model)   its model's pace (if it has one), then a slot in
                                             the window, then the account's pace
    slot.go(who)                        the attempt of request `who` leaves now (or
                                        slot.unused(): it does not)
    slot.answered(latency, headers, used_tokens)   or   slot.failed(error)

A scope is the account, or one model (`pipeline.pace.scopes`); each has a pacer (`local`, or
a shared one) and a rate finder (`finder`) reading what the server lets through. A request
waiting for its model's pace holds no slot in flight: the other models' requests fly.
`tokens` (`pipeline.pace.tokens`) learns what the server counts of a request's tokens: all
it reserved, or what its answer used.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from pipeline.errors import CannotConnect, HTTPStatusError, RequestError
from pipeline.pace.finder import RateFinder
from pipeline.pace.local import Pacer
from pipeline.pace.scopes import Scope, Scopes
from pipeline.pace.tokens import TokenCount, says_tokens
from pipeline.pace.window import Window
from pipeline.send.status import Signal, endpoint_failed, signal


class Seat(Protocol):
    """A worker's place in the crew (`pipeline.run.control.Seat`)."""

    def step_out(self) -> bool: ...
    def rejoin(self) -> None: ...


class Slot:
    """One attempt's place: held from its start until its answer (or error) is in."""

    __slots__ = ("_gate", "held", "model", "own", "reserved", "scope", "ticket", "who")

    def __init__(
        self, gate: Gate, reserved: int, model: str | None = None, scope: Scope | None = None, held: int = 0
    ) -> None:
        self._gate = gate
        self.reserved = reserved  # tokens held back for it by the account's token pace
        self.ticket = 0  # its place in the send order, for the rate finder
        self.who: object = None  # the request it is an attempt of (None: one of its own)
        self.model = model
        self.scope = scope  # its model's, if that has one
        self.held = held  # tokens held back for it by its model's token pace
        self.own = -1  # its place in its model's send order

    def go(self, who: object = None) -> None:
        gate = self._gate
        self.ticket = gate.finder.sent(gate.scopes.tag(self.model))
        if self.scope is None and self.model is not None and gate.scopes.by_model:
            self.scope = gate.scopes.by_model.get(self.model)  # a scope found while it waited
        if self.scope is not None:
            self.own = self.scope.finder.sent()
        self.who = who

    def _scoped(self) -> Scope | None:
        """Its model's scope, also one found since it left (its ticket moved there)."""
        scope = self.scope
        if scope is None and self.model is not None and self._gate.scopes.by_model:
            scope = self.scope = self._gate.scopes.by_model.get(self.model)
            if scope is not None:
                self.own = scope.moved.pop(self.ticket, -1)
        return scope

    def unused(self) -> None:
        """The run stopped before the attempt was sent."""
        gate = self._gate
        gate.window.release()
        gate.pacer.settle(self.reserved, 0)
        if self.scope is not None:
            self.scope.pacer.settle(self.held, 0)

    def answered(self, latency: float, headers: Mapping[str, str] | None, used_tokens: int) -> None:
        gate = self._gate
        gate.window.release()
        # What the server counts of it: all it reserved, or only what it used (`pace.tokens`).
        gate.pacer.settle(
            self.reserved, gate.tokens.counted(self.reserved, used_tokens, binding=gate.pacer.holding)
        )
        gate.finder.success(self.ticket, latency)
        finder = gate.finder
        scope = self._scoped()
        if scope is not None:
            finder = scope.finder
            scope.pacer.settle(
                self.held, scope.tokens.counted(self.held, used_tokens, binding=scope.pacer.holding)
            )
            if self.own >= 0:
                finder.success(self.own, latency)
        if headers:
            finder.headers(headers)  # a model's own limits, where it has a scope

    def failed(self, error: RequestError) -> None:
        gate = self._gate
        gate.window.release()
        meaning = signal(error)
        # An error the server answered was not counted against its token budget, but a
        # refusal keeps its tokens all the same: the server is full, and handed back they
        # would send the next request into the same refusal at once. One that got no answer
        # may have been counted.
        counted = meaning is Signal.PUSHBACK or not isinstance(error, HTTPStatusError)
        gate.pacer.settle(self.reserved, self.reserved if counted else 0)
        scope = self._scoped()
        if scope is not None:
            scope.pacer.settle(self.held, self.held if counted else 0)
        if meaning is Signal.PUSHBACK and says_tokens(error.message, error.limits):
            if self.reserved:
                gate.pacer.settle(0, gate.tokens.refused())
            if scope is not None and self.held:
                scope.pacer.settle(0, scope.tokens.refused())
        if error.limits:
            (gate.finder if scope is None else scope.finder).headers(error.limits)
        if meaning is Signal.PUSHBACK:
            gate.pushback(self, error.retry_after, error.message)
        elif meaning is Signal.ANSWERED:
            gate.finder.answered(self.ticket)  # the request's fault, not the endpoint's
            if scope is not None and self.own >= 0:
                scope.finder.answered(self.own)
        if endpoint_failed(error):  # a 503 too: overloaded, or down
            # Down as a whole, no request is at fault: the retry sends it again, spending nothing.
            error.outage = gate.finder.failure(
                self.ticket, error.message, who=self.who, connected=not isinstance(error, CannotConnect)
            )
        elif error.refusal:
            gate.finder.outage.answered()  # a 429 is an answer: the endpoint is up


class Gate:
    def __init__(
        self,
        pacer: Pacer,
        window: Window,
        finder: RateFinder,
        scopes: Scopes | None = None,
        tokens: TokenCount | None = None,
    ) -> None:
        self.pacer = pacer
        self.window = window
        self.finder = finder
        self.scopes = scopes or Scopes(finder)
        # A shared pace does not probe: each of its processes would pay a probe's refusals
        # on a server that counts on arrival (several: the processes' hand-backs add up).
        self.tokens = tokens or TokenCount(probe=not pacer.shared)

    async def enter(self, tokens: int, model: str | None = None, seat: Seat | None = None) -> Slot:
        """Wait for the model's pace, if it has one, then for a slot in flight, then for the
        account's start time (a slot before the account's pace, so that a paced start is not
        spent waiting for a slot; the model's before the slot, so that a request held back by
        its model holds no slot the others could use, nor its worker's `seat` in the crew).
        `tokens`: the request's estimate."""
        scopes = self.scopes
        scope = scopes.by_model.get(model) if model is not None and scopes.by_model else None
        held = 0
        if scope is not None:
            stepped = seat is not None and seat.step_out()
            scope.waiting += 1
            try:
                held = await scope.pacer.acquire(tokens)
            finally:
                scope.waiting -= 1
                if stepped:
                    assert seat is not None
                    seat.rejoin()
        try:
            await self.window.acquire()
            try:
                reserved = await self.pacer.acquire(tokens)
            except BaseException:
                self.window.release()
                raise
        except BaseException:
            if scope is not None:
                scope.pacer.settle(held, 0)
            raise
        return Slot(self, reserved, model, scope, held)

    def pushback(self, slot: Slot, wait: float | None, message: str) -> None:
        """The server refused the attempt in `slot`: the refusal counts against its model's
        scope, if it has one or this refusal shows it needs one, else against the account."""
        scope = slot.scope
        finder = self.finder
        if scope is None and slot.model is not None:
            found = self.scopes.refused(slot.ticket, slot.model)
            if isinstance(found, Scope):
                scope, slot.scope, slot.own = found, found, found.moved.pop(slot.ticket, -1)
            elif not found:
                finder.log.refuse(slot.ticket)  # not let through, and not the account's limit
                return
        if scope is None:
            cuts = finder.cuts
            finder.pushback(slot.ticket, wait, message)
            if finder.cuts != cuts:
                self.scopes.blame(slot.ticket, slot.model)
            return
        finder.log.refuse(slot.ticket)  # not let through; the model's limit to read
        if slot.own >= 0:
            scope.finder.pushback(slot.own, wait, message)

    def crowded(self, model: str | None) -> bool:
        return self.scopes.crowded(model)

    def wake_all(self) -> None:
        """The run stops: whatever waits at the gate finds out at once."""
        self.pacer.wake_all()
        self.window.wake_all()
        self.scopes.wake_all()
