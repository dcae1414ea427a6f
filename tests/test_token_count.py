"""A given --tpm on either token accounting (issue 21, point 3): the server counts a request's
prompt and max_tokens on arrival (OpenAI's way), or what its answer used. pipeline reserves
what such a limiter counts, and learns which way the server counts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

import pipeline
from pipeline.input.line import LineParser
from pipeline.mock.limits import charged_tokens
from pipeline.pace.leased import shared_pacer
from pipeline.pace.pacer import Pacer
from pipeline.pace.store import Store
from pipeline.pace.tokens import CONFIRM, FLOOD, PROBE_AFTER, PROBE_AGAIN, RAMP, Counting, TokenCount
from pipeline.settings import build

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wizards",
    "quietly",
    "hum",
]


def prose(i: int, words: int = 40) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words))


def test_a_request_reserves_what_a_limiter_counting_characters_charges(tmp_path: Path) -> None:
    # English prose runs about five characters a token, where OpenAI's limiter counts four
    # (the mock's arrival count does the same): the exact count alone reserved some 13 % less
    # than the server charged, and a pace at the limit went 13 % over it.
    parser = LineParser(
        build(None, input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out")), exact_tokens=True
    )
    for i in range(20):
        body = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": prose(i)}]}
        request = parser.request(parser.parse(orjson.dumps(body)), custom_id=f"job-{i}", line=i)
        assert request.prompt_tokens < request.token_estimate - 64  # the tokenizer counts fewer
        assert request.token_estimate == charged_tokens(body, count="arrival")


TOKENS = 4000.0  # tokens a second the server allows, counted per wall-clock second


def prose_bodies(n: int) -> list[dict[str, Any]]:
    """Requests of a 200-character prompt and max_tokens 64, answered in 12 to 35 tokens."""
    return [
        {
            "custom_id": f"job-{i}",
            "model": "m",
            "max_tokens": 64,
            "messages": [{"role": "user", "content": prose(i)}],
        }
        for i in range(n)
    ]


@pytest.mark.parametrize(("count", "n"), [("arrival", 140), ("usage", 300)])
async def test_a_given_tpm_is_used_whole_on_either_accounting_with_few_refusals(
    mock: Any, make_settings: Any, count: str, n: int
) -> None:
    """Four to six seconds at the limit. Counted on arrival, a pace that handed back the unused
    part of each reservation went 1.5x over the limit, and one that reserved the tokenizer's
    count of the prompt 13 % over it; counted as answers use them, one that kept every
    reservation whole used two thirds of the limit."""
    rows = prose_bodies(n)
    charge = sum(charged_tokens(body, count=count) for body in rows) / n
    async with mock(tpm=TOKENS * 60, tpm_count=count, latency=0.02) as (url, server):
        summary = await pipeline.run(make_settings(url, rows, tpm=TOKENS * 60, concurrency=64))
        accepted = dict(server.state.accepted_per_second)
        refused = sum(server.state.refused_per_second.values())
    assert summary.succeeded == n
    seconds = [accepted[s] for s in sorted(accepted)][1:-1]  # whole seconds at the pace
    share = sum(seconds) * charge / len(seconds) / TOKENS
    assert share >= 0.85, (share, accepted)  # the first whole second holds the probe's ramp
    assert refused <= 2, (refused, accepted)  # on arrival, the probe's


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answer(count: TokenCount, clock: Clock, at: float, reserved: int = 100, used: int = 60) -> int:
    clock.now = 1000.0 + at
    return count.counted(reserved, used, binding=True)


def test_a_probe_the_server_refuses_keeps_reservations_whole_and_takes_back_its_hand_backs() -> None:
    clock = Clock()
    count = TokenCount(clock=clock)
    assert [answer(count, clock, t) for t in (0.0, PROBE_AFTER)] == [100, 100]  # kept, then a probe
    handed = [100 - answer(count, clock, PROBE_AFTER + RAMP * share) for share in (0.25, 0.5)]
    assert handed == [10, 20]  # a growing share of the 40 unused
    assert count.refused() == 30  # the server counted them: counted again
    assert count.counting is Counting.ARRIVAL
    assert answer(count, clock, PROBE_AFTER + RAMP + CONFIRM + 30) == 100  # no probe for a while
    assert count.factor == 1.0  # the probe's refusal says nothing of the pace without it


def test_after_a_refused_probe_the_next_waits_a_minute_of_binding_pace_then_two() -> None:
    clock = Clock()
    count = TokenCount(clock=clock)
    at = 0.0
    for wait in (PROBE_AFTER, PROBE_AGAIN, 2 * PROBE_AGAIN):
        answer(count, clock, at)  # the pace binds from here, none refused
        answer(count, clock, at + wait - 0.1)
        assert count.counting is Counting.ARRIVAL  # reservations still kept whole
        answer(count, clock, at + wait)
        assert count.counting is Counting.PROBE
        clock.now += RAMP / 2
        count.refused()  # the server counts on arrival
        at = clock.now - 1000.0 + 1.0


def test_a_server_that_counts_usage_gets_the_unused_part_back_until_a_flood_says_otherwise() -> None:
    clock = Clock()
    count = TokenCount(clock=clock)
    for tenth in range(int((PROBE_AFTER + RAMP + CONFIRM) * 10) + 2):
        answer(count, clock, tenth / 10)
    assert count.counting is Counting.USAGE
    assert answer(count, clock, 10.0) == 60
    assert answer(count, clock, 10.0, used=0) == 100  # an answer that states no usage keeps it all
    assert count.refused() == 0  # a lone refusal at a pace that should fit: count more...
    # ...by half a step (usage is the answer's own count: the window's coarseness spilled)
    assert (count.counting, answer(count, clock, 10.1)) == (Counting.USAGE, 61)
    assert [count.refused() for _ in range(FLOOD - 1)][-1] > 0  # a flood: the hand-backs taken back
    assert count.counting is Counting.ARRIVAL
    assert answer(count, clock, 10.2) == 101


def test_a_shared_pace_keeps_reservations_whole() -> None:
    clock = Clock()
    count = TokenCount(probe=False, clock=clock)
    assert {answer(count, clock, t / 10) for t in range(100)} == {100}


def test_a_shared_pacer_keeps_reservations_whole_where_a_local_one_probes() -> None:
    """Which pace probes is the pacer's to say since the count moved into it: a shared one (the
    account's or a model's, `Host.pacer`) never does, or each of its processes would pay a
    probe's refusals on a server counting on arrival."""
    shared = shared_pacer(lambda: Store("redis://127.0.0.1:1", "unused"), "a store", token_rate=100.0)
    local = Pacer(token_rate=100.0)
    counts = []
    for pacer in (shared, local):
        clock = Clock()
        pacer.tokens.clock = clock
        counts.append({answer(pacer.tokens, clock, t / 10) for t in range(100)})
    assert counts[0] == {100}
    assert counts[1] != {100}  # the local one hands some back: the same clock would show a probe
