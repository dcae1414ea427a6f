"""The pace's one face to the worker: a request waits at the gate for a slot in flight and a
start time, and tells the gate how its attempt ended, so that the pace learns from it.

    slot = await gate.enter(tokens)     a slot in the window, then the pacer's start time
    slot.go(who)                        the attempt of request `who` leaves now (or
                                        slot.unused(): it does not)
    slot.answered(latency, headers, used_tokens)   or   slot.failed(error)

This is the seam a shared pace (one limit for several processes) plugs into: another gate
with the same three calls. Today's gate is local: the pacer and the window of `local`, with
the rate finder (`finder`) reading what the server lets through, and `tokens` learning what
the server counts of a request's tokens (all it reserved, or what its answer used).
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.errors import CannotConnect, HTTPStatusError, RequestError
from pipeline.pace.finder import RateFinder
from pipeline.pace.local import Pacer, Window
from pipeline.pace.tokens import TokenCount, says_tokens
from pipeline.send.status import Signal, endpoint_failed, signal


class Slot:
    """One attempt's place: held from its start until its answer (or error) is in."""

    __slots__ = ("_gate", "reserved", "ticket", "who")

    def __init__(self, gate: Gate, reserved: int) -> None:
        self._gate = gate
        self.reserved = reserved  # tokens held back for it by a token pace
        self.ticket = 0  # its place in the send order, for the rate finder
        self.who: object = None  # the request it is an attempt of (None: one of its own)

    def go(self, who: object = None) -> None:
        self.ticket = self._gate.finder.sent()
        self.who = who

    def unused(self) -> None:
        """The run stopped before the attempt was sent."""
        gate = self._gate
        gate.window.release()
        gate.pacer.settle(self.reserved, 0)

    def answered(self, latency: float, headers: Mapping[str, str] | None, used_tokens: int) -> None:
        gate = self._gate
        gate.window.release()
        # What the server counts of it: all it reserved, or only what it used (`pace.tokens`).
        gate.pacer.settle(
            self.reserved, gate.tokens.counted(self.reserved, used_tokens, binding=gate.pacer.holding)
        )
        gate.finder.success(self.ticket, latency)
        if headers:
            gate.finder.headers(headers)

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
        if meaning is Signal.PUSHBACK and self.reserved and says_tokens(error.message, error.limits):
            gate.pacer.settle(0, gate.tokens.refused())
        if error.limits:
            gate.finder.headers(error.limits)
        if meaning is Signal.PUSHBACK:
            gate.finder.pushback(self.ticket, error.retry_after, error.message)
        elif meaning is Signal.ANSWERED:
            gate.finder.answered(self.ticket)  # the request's fault, not the endpoint's
        if endpoint_failed(error):  # a 503 too: overloaded, or down
            # Down as a whole, no request is at fault: the retry sends it again, spending nothing.
            error.outage = gate.finder.failure(
                self.ticket, error.message, who=self.who, connected=not isinstance(error, CannotConnect)
            )
        elif error.refusal:
            gate.finder.outage.answered()  # a 429 is an answer: the endpoint is up


class Gate:
    def __init__(
        self, pacer: Pacer, window: Window, finder: RateFinder, tokens: TokenCount | None = None
    ) -> None:
        self.pacer = pacer
        self.window = window
        self.finder = finder
        # A shared pace does not probe: each of its processes would pay a probe's refusals
        # on a server that counts on arrival (several: the processes' hand-backs add up).
        self.tokens = tokens or TokenCount(probe=type(pacer) is Pacer)

    async def enter(self, tokens: int) -> Slot:
        """Wait for a slot in flight, then for a start time (a slot first, so that a paced
        start is not spent waiting for a slot). `tokens`: the request's token estimate."""
        await self.window.acquire()
        try:
            reserved = await self.pacer.acquire(tokens)
        except BaseException:
            self.window.release()
            raise
        return Slot(self, reserved)

    def wake_all(self) -> None:
        """The run stops: whatever waits at the gate finds out at once."""
        self.pacer.wake_all()
        self.window.wake_all()
