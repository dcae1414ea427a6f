"""Which limit a refusal reads, told from the send order alone: a fake clock, no server."""

from __future__ import annotations

from pipeline.pace.finder import RateFinder
from pipeline.pace.gate import Gate, Slot
from pipeline.pace.local import Pacer, Window
from pipeline.pace.scopes import Scope, Scopes
from tests.simulated import Clock

PAID = "v/paid"


def _gate() -> tuple[Gate, Clock]:
    clock = Clock()
    finder = RateFinder(Pacer(), Window(200), clock=clock, stop=lambda stopped: None)
    return Gate(finder.pacer, finder.window, finder, Scopes(finder)), clock


def _send(gate: Gate, *models: str) -> list[Slot]:
    slots = []
    for model in models:
        slot = Slot(gate, 0, model)
        slot.go()
        slots.append(slot)
    return slots


def _through(gate: Gate, slots: list[Slot]) -> None:
    for slot in slots:
        gate.finder.success(slot.ticket, 0.1)


def _refuse(gate: Gate, slots: list[Slot]) -> None:
    for slot in slots:
        gate.pushback(slot, None, "429")


async def test_an_account_pace_read_at_several_models_refusals_is_dropped_once_each_has_its_own() -> None:
    """Four `:free` models, each limited on its own, among a paid model's lines: their
    retries come back together, and twice a run of refusals in the account's send order is
    made of two of them. The account's pace read there is theirs: once each has a pace of its
    own, the paid model's lines go unpaced again."""
    gate, clock = _gate()
    finder = gate.finder
    _through(gate, _send(gate, PAID, PAID))
    _refuse(gate, _send(gate, "a:free", "b:free", "a:free", "b:free"))
    assert finder.cuts == 1  # read as the account's, for now: two models may meet its limit
    clock.now += 2.0
    _through(gate, _send(gate, PAID, PAID))
    _refuse(gate, _send(gate, "c:free", "d:free", "c:free", "d:free"))
    assert finder.cuts == 2
    assert finder.pacer.request_rate is not None  # the paid model held to their limit
    for model in ("a:free", "b:free", "c:free", "d:free"):
        clock.now += 2.0
        for _ in range(4):
            slots = _send(gate, model, PAID, PAID)
            _through(gate, slots[1:])
            _refuse(gate, slots[:1])
        assert isinstance(gate.scopes.by_model.get(model), Scope)
    assert finder.limit is None
    assert finder.pacer.request_rate is None  # the paid model's lines unpaced again
