"""The pace's one face to the worker: a request waits at the gate for its scopes' start times
and a slot in flight, and tells it how its attempt ended, so that its scopes learn.

    slot = await gate.enter(tokens, model)   its model's pacer (if it has a scope), the window,
                                             the account's pacer
    slot.go(who)                             request `who`'s attempt leaves (or slot.unused())
    slot.answered(latency, headers, used_tokens)   or   slot.failed(error): each scope's
                                             pacer (its tokens) and finder

A request's scopes are its model's, where it has one, then the account's: each hook is one loop
over them. Not per scope: the window (in flight is bounded once) and an outage (judged from
every request by the account's finder); whose limit a refusal is, `Scopes.refused` says.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from pipeline.errors import CannotConnect, HTTPStatusError, RequestError
from pipeline.pace.scopes import Scope, Scopes
from pipeline.send.status import Signal, endpoint_failed, signal

if TYPE_CHECKING:
    from pipeline.run.control import Seat


class GivenUp(Exception):
    """The request's model lets nothing through: its lines fail unsent this run."""


class Slot:
    """One attempt's place, from its start until its answer is in: in each of its `scopes`,
    the tokens it `reserved` and its ticket (its place in the send order)."""

    __slots__ = ("_gate", "made", "model", "reserved", "scopes", "tickets", "who")

    def __init__(self, gate: Gate, scopes: tuple[Scope, ...], model: str | None = None) -> None:
        self._gate = gate
        self.scopes = scopes
        self.model = model
        self.made = gate.scopes.made  # model scopes made when it entered
        self.reserved: list[int] = []
        self.tickets: list[int] = []
        self.who: object = None  # the request it is an attempt of (None: one of its own)

    def catch_up(self) -> None:
        """Its model got a scope since the request entered: it is that scope's too (reserving
        nothing there; its ticket, once sent, the one its send was moved to)."""
        scopes = self._gate.scopes
        self.made = scopes.made
        scope = scopes.by_model.get(self.model) if self.model is not None else None
        if scope is not None and scope.chain is not self.scopes:
            self.scopes = scope.chain
            self.reserved = [0, *self.reserved]
            if self.tickets:
                self.tickets = [scope.moved.pop(self.tickets[-1], -1), *self.tickets]

    def go(self, who: object = None) -> None:
        scopes = self._gate.scopes
        if self.made != scopes.made:
            self.catch_up()
        tag, tickets = 0 if self.model is None else scopes.tags[self.model], self.tickets
        for scope in self.scopes:
            tickets.append(scope.finder.sent(tag))
        self.who = who

    def _hand_back(self) -> None:
        for scope, reserved in zip(self.scopes, self.reserved, strict=False):
            scope.pacer.settle(reserved, 0)

    def unused(self) -> None:
        self._gate.window.release()
        self._hand_back()

    def answered(self, latency: float, headers: Mapping[str, str] | None, used_tokens: int) -> None:
        self._gate.window.release()
        if self.made != self._gate.scopes.made:
            self.catch_up()
        for i, scope in enumerate(self.scopes):  # (not zip: its iterators cost more)
            if reserved := self.reserved[i]:  # (none where no token pace is in force: most)
                scope.pacer.answered(reserved, used_tokens)
            scope.finder.success(self.tickets[i], latency)
        if headers:
            self.scopes[0].finder.headers(headers)  # its model's own limits, where it has a scope

    def failed(self, error: RequestError) -> None:
        gate = self._gate
        try:
            self._failed(gate, error)
        finally:
            # Its slot freed once the failure is read: a refusal's stall (`Window.stall`) holds
            # this slot back too, where freed first it went to a waiter at the refusal's instant.
            gate.window.release()

    def _failed(self, gate: Gate, error: RequestError) -> None:
        if self.made != gate.scopes.made:
            self.catch_up()
        meaning = signal(error)
        # An error the server answered was not counted against its token budget, but a refusal
        # keeps its tokens all the same: the server is full, and handed back they would send
        # the next request into the same refusal at once. One that got no answer may have been.
        counted = meaning is Signal.PUSHBACK or not isinstance(error, HTTPStatusError)
        refusal = error if meaning is Signal.PUSHBACK else None
        last = len(self.scopes) - 1
        for i, scope in enumerate(self.scopes):
            scope.pacer.failed(self.reserved[i], counted, refusal)
            # The request's fault, not the endpoint's; or the endpoint's, which the account
            # judges (below) and a model's scope is told only as an answer, for its reading.
            if meaning is Signal.ANSWERED or (meaning is Signal.FAILURE and i < last):
                scope.finder.answered(self.tickets[i])
        if error.limits:
            self.scopes[0].finder.headers(error.limits)
        if meaning is Signal.PUSHBACK:
            gate.scopes.refused(self, error.retry_after, error.message)
        account, ticket = self.scopes[-1].finder, self.tickets[-1]
        if endpoint_failed(error):  # a 503 too: overloaded, or down
            # Down as a whole, no request is at fault: the retry sends it again, spending nothing.
            connected = not isinstance(error, CannotConnect)
            error.outage = account.failure(ticket, error.message, who=self.who, connected=connected)
        elif error.refusal:
            account.outage.answered()  # a 429 is an answer: the endpoint is up


class Gate:
    def __init__(self, scopes: Scopes) -> None:
        self.scopes = scopes
        self.account = scopes.account
        self.window = scopes.window
        self.crowded = scopes.crowded

    async def enter(self, tokens: int, model: str | None = None, seat: Seat | None = None) -> Slot:
        """Wait for the model's pace, if it has one, then for a slot in flight, then for the
        account's start time (a slot before the account's pace, so that a paced start is not
        spent waiting for a slot; the model's before the slot, so that a request held back by
        its model holds no slot the others could use, nor its worker's `seat` in the crew).
        `tokens`: the request's estimate. Raises `GivenUp` if its model was given up."""
        by_model = self.scopes.by_model
        scope = by_model.get(model) if by_model and model is not None else None
        slot = Slot(self, (scope or self.account).chain, model)
        try:
            for scope in slot.scopes[:-1]:  # its model's
                stepped = seat is not None and seat.step_out()
                scope.waiting += 1
                try:
                    slot.reserved.append(await scope.pacer.acquire(tokens))
                finally:
                    scope.waiting -= 1
                    if seat is not None and stepped:
                        seat.rejoin()
                if scope.given_up:
                    raise GivenUp(scope.given_up)
            if not self.window.take():
                await self.window.wait()
        except BaseException:
            slot._hand_back()
            raise
        try:
            pacer = self.account.pacer
            # (its turn taken without a coroutine where it has come, as for most requests)
            reserved = pacer.take(tokens)
            slot.reserved.append(reserved if reserved is not None else await pacer.wait(tokens))
            if scope is not None and scope.given_up:  # given up while it waited past its pace
                raise GivenUp(scope.given_up)
        except BaseException:
            slot.unused()
            raise
        return slot

    def wake_all(self) -> None:
        self.window.wake_all()
        self.scopes.wake_all()
