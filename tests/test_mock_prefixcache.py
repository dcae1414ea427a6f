"""The mock's prompt cache (`pipeline mock --prefix-cache N`) behaves as a provider's: a long
shared prefix is read from it by the next request, a few prefixes a model are kept, the least
recently used dropped first, each for its ttl on the mock's clock; what it served is in the
answer's usage, priced at a quarter, and in the mock's stats."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import random
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.mock.answers import PRICE_PROMPT, completion, estimate_tokens
from pipeline.mock.command import add_mock_flags, mock_config
from pipeline.mock.prefixcache import MODELS_KEPT, PrefixCache, Reading, Served
from tests.simulated import Clock

LONG = 1200  # tokens of a system prompt: over the 1,024 cached at least


def system(n: int, tokens: int = LONG) -> dict[str, Any]:
    return {"role": "system", "content": f"Instructions {n:03d}. " + "x" * (4 * tokens - 20)}


def body(n: int, question: str = "what?", **more: Any) -> dict[str, Any]:
    return {"model": "m", "messages": [system(n), {"role": "user", "content": question}], **more}


def cache(size: int = 3, clock: Clock | None = None, min_tokens: int = 1024) -> PrefixCache:
    return PrefixCache(size=size, ttl=300.0, min_tokens=min_tokens, clock=clock or Clock())


def test_the_second_request_with_the_same_long_system_prompt_reads_it_from_the_cache() -> None:
    c = cache()
    assert c.serve(body(1, "first")) == Served(0, 0)
    second = c.serve(body(1, "second"))
    assert second.cached == estimate_tokens({"messages": [system(1)]}) - 3  # the system message's share
    assert second.cached >= LONG
    assert c.serve(body(2, "other")) == Served(0, 0)  # another system prompt: not cached yet
    short = {"model": "m", "messages": [system(3, tokens=500), {"role": "user", "content": "a"}]}
    assert c.serve(short) == c.serve(short) == Served(0, 0)  # under 1,024 tokens: never cached


def test_a_prefix_is_dropped_after_n_others_and_a_read_keeps_it() -> None:
    c = cache(size=3)
    for n in (1, 2, 3):
        c.serve(body(n))
    assert c.serve(body(1)).cached > 0  # read: now the most recently used
    c.serve(body(4))  # drops 2, the least recently used
    assert c.serve(body(3)).cached > 0
    assert c.serve(body(1)).cached > 0
    assert c.serve(body(2)).cached == 0
    assert c.kept("m") == 3
    for n in (5, 6, 7):  # three others after 1's last use
        c.serve(body(n))
    assert c.serve(body(1)).cached == 0
    # A read alone (the instructions sent with nothing after them: nothing to write) keeps it too.
    c.serve(body(8))
    assert c.serve({"model": "m", "messages": [system(7)]}).cached > 0
    c.serve(body(9))  # drops 1, not 7
    assert c.serve(body(7)).cached > 0


def test_a_prefix_expires_its_ttl_after_its_last_use_on_the_mocks_clock() -> None:
    clock = Clock()
    c = cache(clock=clock)
    c.serve(body(1))
    clock.now += 299
    assert c.serve(body(1)).cached > 0  # used again: kept 300 s from now
    clock.now += 299
    assert c.serve(body(1)).cached > 0
    clock.now += 300
    assert c.kept("m") == 0
    assert c.serve(body(1)).cached == 0


def test_models_and_prompt_cache_keys_keep_their_own_prefixes() -> None:
    c = cache(size=1)
    c.serve(body(1))
    c.serve(body(1) | {"model": "other"})  # another model's room: the first is kept
    assert c.serve(body(1)).cached > 0
    c.serve(body(1, prompt_cache_key="k"))
    assert c.serve(body(1, prompt_cache_key="k")).cached > 0
    assert c.serve(body(1, prompt_cache_key="j")).cached == 0  # another key routes elsewhere


def test_many_models_at_once_hold_a_bounded_cache() -> None:
    """A client naming a new model on every line: the mock keeps the prefixes of the last
    MODELS_KEPT models asked (where it kept every model's for their ttl, and looked through all
    of them for each new name: minutes of CPU and unbounded memory over a few thousand names)."""
    c = cache()
    for i in range(MODELS_KEPT + 50):
        c.serve(body(1) | {"model": f"m{i}"})
    assert sum(c.kept(f"m{i}") for i in range(MODELS_KEPT + 50)) == MODELS_KEPT
    assert c.serve(body(1) | {"model": f"m{MODELS_KEPT + 49}"}).cached > 0  # the latest keep theirs
    assert c.serve(body(1) | {"model": "m0"}).cached == 0


def test_tools_lead_the_prompt_and_a_prompt_of_one_message_is_kept_whole() -> None:
    c = cache()
    tool = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    c.serve(body(1, tools=tool))
    assert c.serve(body(1)).cached == 0  # the same messages, without the tools: another prefix
    assert c.serve(body(1, tools=tool)).cached > 0
    # A long prompt of one message, sent again: OpenAI keeps the whole prompt it processed.
    alone = {"model": "m", "messages": [{"role": "user", "content": "y" * 8000}]}
    assert c.serve(alone) == Served(0, 0)
    assert c.serve(alone).cached == 2004


def test_a_prefix_may_end_inside_a_message_at_a_part() -> None:
    """Anthropic's usual shape: one user message, the document marked, then the question; and
    the same photo asked about in two languages, behind a long system prompt."""
    c = cache()
    document = {"type": "text", "text": "Contract. " + "x" * 4800, "cache_control": {"type": "ephemeral"}}

    def ask(question: str) -> dict[str, Any]:
        parts = [document, {"type": "text", "text": question}]
        return {"model": "m", "messages": [{"role": "user", "content": parts}]}

    first = c.serve(ask("Who signs?"))
    assert first.cached == 0
    assert first.written >= LONG
    assert c.serve(ask("When does it end?")) == Served(first.written, 0)
    photo = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}

    def caption(language: str) -> dict[str, Any]:
        question = {"type": "text", "text": f"Caption this in {language}."}
        return {"model": "m", "messages": [system(2), {"role": "user", "content": [photo, question]}]}

    c.serve(caption("French"))
    french = c.serve(caption("French")).cached  # all of it, the question too
    # the system prompt, then the user message's role (4) and the photo (no tokens in the mock)
    assert french > c.serve(caption("German")).cached == estimate_tokens({"messages": [system(2)]}) - 3 + 4


def test_a_text_and_the_same_text_as_a_marked_part_are_one_prefix() -> None:
    """Lines sent plainly warm the cache for lines the tool marks for Anthropic (their text put in
    a part with `cache_control`): the tokens are the same."""
    c = cache()
    c.serve(body(1, "plain"))
    marked = [{"type": "text", "text": system(1)["content"], "cache_control": {"type": "ephemeral"}}]
    served = c.serve(
        {"model": "m", "messages": [{"role": "system", "content": marked}, {"role": "user", "content": "b"}]}
    )
    assert served.cached == estimate_tokens({"messages": [system(1)]}) - 3
    assert served.written == 0


def test_unique_middles_do_not_crowd_out_other_prompts() -> None:
    """Lines of [instructions, their own document, a question]: each keeps its prompt, and all
    of one system prompt's share its one place, so the other system prompts stay."""
    c = cache(size=2)
    c.serve(body(1))
    c.serve(body(2))
    for n in range(3):
        doc = {"role": "user", "content": f"Document {n}: " + "y" * 400}
        c.serve({"model": "m", "messages": [system(1), doc, {"role": "user", "content": "sum up"}]})
    assert c.serve(body(2)).cached > 0


def test_requests_sent_together_with_a_new_prefix_all_miss_it() -> None:
    """A prefix is cached once a request has processed it: those that arrived before its answer
    miss it, and with markers each pays its write, as Anthropic charges."""
    c = cache()
    together = [c.read(body(1, str(n))) for n in range(3)]
    assert [c.write(r) for r in together] == [Served(0, 0)] * 3
    assert c.serve(body(1, "after")).cached >= LONG
    marked = {"type": "text", "text": "Rules. " + "x" * 4800, "cache_control": {"type": "ephemeral"}}
    asks = [{"model": "m", "messages": [{"role": "system", "content": [marked]}, {"role": "user", "content": q}]}
            for q in "ab"]  # fmt: skip
    readings = [c.read(a) for a in asks]
    written = [c.write(r) for r in readings]
    assert written[0] == written[1]
    assert written[0].cached == 0
    assert written[0].written >= LONG


async def test_through_http_two_requests_at_once_with_a_new_prefix_both_miss(mock: Any) -> None:
    async with (
        mock(prefix_cache=8, latency=0.1, clock=Clock()) as (url, _),
        aiohttp.ClientSession() as session,
    ):

        async def send(question: str) -> int:
            async with session.post(f"{url}/chat/completions", json=body(5, question)) as r:
                return int((await r.json())["usage"]["prompt_tokens_details"]["cached_tokens"])

        assert await asyncio.gather(send("one"), send("two")) == [0, 0]
        assert await send("three") >= LONG


def _lines(count: int, prompts: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    return [body(rng.randrange(prompts), f"question {n}") for n in range(count)]


def _cached(c: PrefixCache, lines: list[dict[str, Any]], wave: int = 1) -> int:
    """The prompt tokens cached, the lines sent `wave` at a time (each wave arriving before any
    of its answers)."""
    cached = 0
    for i in range(0, len(lines), wave):
        cached += sum(c.write(r).cached for r in [c.read(b) for b in lines[i : i + wave]])
    return cached


def test_the_target_is_reachable_by_grouping_and_sending_a_groups_first_line_alone() -> None:
    """Issue 23's scenario (8 kept of 50 system prompts) at 2,000 lines: input order gets about
    8/50 of the system prompts' tokens; the lines grouped by prompt and sent one at a time, all
    but each group's first; grouped but sent 32 at once, each group's first wave misses, unless
    its first line goes alone and the rest follow its answer."""
    lines = _lines(2000, 50, seed=23)
    prompt = sum(estimate_tokens(b) for b in lines)
    system_share = estimate_tokens({"messages": [system(0)]}) / estimate_tokens(lines[0])
    assert _cached(cache(size=8), lines) / prompt == pytest.approx(8 / 50 * system_share, abs=0.03)
    grouped = sorted(lines, key=lambda b: str(b["messages"][0]["content"]))
    assert _cached(cache(size=8), grouped) / prompt == pytest.approx(1 - 50 / 2000, abs=0.01)
    assert _cached(cache(size=8), grouped, wave=32) / prompt < 0.7
    c = cache(size=8)
    warmed = 0
    for _, group in itertools.groupby(grouped, key=lambda b: str(b["messages"][0]["content"])):
        first, *rest = group
        warmed += c.serve(first).cached + _cached(c, rest, wave=32)
    assert warmed / prompt >= 0.9


def test_cache_control_writes_the_prefix_up_to_the_marker_and_says_so() -> None:
    c = cache()
    marked = {
        "type": "text",
        "text": "Instructions 001. " + "x" * 4800,
        "cache_control": {"type": "ephemeral"},
    }
    first = {
        "model": "m",
        "messages": [{"role": "system", "content": [marked]}, {"role": "user", "content": "a"}],
    }
    written = c.serve(first)
    assert written.cached == 0
    assert written.written >= LONG
    again = c.serve(first | {"messages": [*first["messages"][:1], {"role": "user", "content": "b"}]})
    assert again == Served(written.written, 0)
    # The marker is not part of the prefix: the same text unmarked reads it too.
    plain = {"model": "m", "messages": [{"role": "system", "content": [{"type": "text", "text": marked["text"]}]},
                                        {"role": "user", "content": "c"}]}  # fmt: skip
    assert c.serve(plain).cached == written.written


def test_the_cost_charges_cached_tokens_at_a_quarter_and_written_at_five_quarters() -> None:
    request = body(1)
    full = completion(request)["usage"]
    cached = completion(request, cache=Served(1000, 0))["usage"]
    written = completion(request, cache=Served(0, 1000))["usage"]
    assert cached["prompt_tokens_details"] == {"cached_tokens": 1000, "cache_write_tokens": 0}
    assert full["cost"] - cached["cost"] == pytest.approx(1000 * 0.75 * PRICE_PROMPT / 1e6)
    assert written["cost"] - full["cost"] == pytest.approx(1000 * 0.25 * PRICE_PROMPT / 1e6)


text = st.text(alphabet="ab ", max_size=60)
part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, text),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, st.sampled_from(["a.png", "b.png"])),
    st.builds(lambda t: {"type": "text", "text": t, "cache_control": {"type": "ephemeral"}}, text),
)
message = st.builds(
    lambda role, content: {"role": role, "content": content},
    st.sampled_from(["system", "user", "assistant"]),
    st.one_of(text, st.lists(part, max_size=3), st.none()),
)
request = st.fixed_dictionaries(
    {"model": st.sampled_from(["m", "n"]), "messages": st.lists(message, min_size=1, max_size=5)},
    optional={"prompt_cache_key": st.sampled_from(["k", "j"]), "tools": st.just([{"type": "function"}])},
)


@settings(max_examples=200)  # each example a few dozen requests
@given(
    st.lists(st.tuples(request, st.floats(0, 20), st.integers(0, 3)), max_size=30),
    st.integers(1, 4),
    st.integers(1, 30),
)
def test_the_cache_never_reports_more_than_the_prompt(
    requests: list[tuple[dict[str, Any], float, int]], size: int, min_tokens: int
) -> None:
    """Whatever the prompts, and however many requests arrive before an earlier one's answer."""
    clock = Clock()
    c = PrefixCache(size=size, ttl=15.0, min_tokens=min_tokens, clock=clock)
    pending: list[tuple[int, dict[str, Any], Reading]] = []  # (arrivals left before its answer, ...)

    def answer(sent: dict[str, Any], reading: Reading) -> None:
        served = c.write(reading)
        prompt = estimate_tokens(sent)
        assert served.cached >= 0
        assert served.written >= 0
        assert served.cached + served.written <= prompt
        assert served.cached == 0 or served.cached >= min_tokens
        assert c.kept(sent["model"]) <= size
        assert completion(sent, cache=served)["usage"]["cost"] > 0

    for sent, later, overlap in requests:
        clock.now += later
        pending.append((overlap, sent, c.read(sent)))
        for item in [p for p in pending if p[0] == 0]:
            pending.remove(item)
            answer(item[1], item[2])
        pending = [(left - 1, b, r) for left, b, r in pending]
    for _, sent, reading in pending:
        answer(sent, reading)


async def test_through_http_the_answer_and_the_stats_say_what_was_cached(mock: Any) -> None:
    async with mock(prefix_cache=8, clock=Clock()) as (url, _), aiohttp.ClientSession() as session:
        usages = []
        for question in ("one", "two", "three"):
            async with session.post(f"{url}/chat/completions", json=body(7, question)) as r:
                usages.append((await r.json())["usage"])
        async with session.get(url.removesuffix("/v1") + "/mock/stats") as r:
            served = (await r.json())["served"]
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    assert cached[0] == 0
    assert cached[1] == cached[2] >= LONG
    assert served["prompt_tokens"] == sum(u["prompt_tokens"] for u in usages)
    assert served["cached_tokens"] == sum(cached)
    assert served["cost"] == pytest.approx(sum(u["cost"] for u in usages))
    assert usages[1]["cost"] < usages[0]["cost"]


async def test_without_the_flag_the_answers_are_as_before(mock: Any) -> None:
    async with mock() as (url, _), aiohttp.ClientSession() as session:
        for question in ("one", "two"):
            async with session.post(f"{url}/chat/completions", json=body(7, question)) as r:
                usage = (await r.json())["usage"]
            assert usage == completion(body(7, question))["usage"]
            assert "cache_write_tokens" not in usage["prompt_tokens_details"]


def test_the_flags_set_the_cache() -> None:
    parser = argparse.ArgumentParser()
    add_mock_flags(parser)
    config = mock_config(parser.parse_args(["--prefix-cache", "8", "--prefix-cache-ttl", "60"]))
    assert (config.prefix_cache, config.prefix_cache_ttl, config.prefix_cache_min_tokens) == (8, 60.0, 1024)
    assert mock_config(parser.parse_args([])).prefix_cache == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--prefix-cache", "0"])
