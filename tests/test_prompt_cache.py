"""`prompt_cache = true` (issue 23, point 3): the markers providers need on a long shared
prefix, and the cached and written prompt tokens counted per model, priced, and reported."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pipeline
from pipeline.account.cost import answer_cost
from pipeline.account.usage import Usage
from pipeline.cache.key import request_key
from pipeline.input.cachemarks import Marks, mark
from pipeline.input.prefix import prefix_key
from pipeline.mock.prefixcache import PrefixCache, Served
from pipeline.prices import Price, check_prices
from pipeline.report.html import html_report
from pipeline.report.markdown import markdown, usage_document
from tests.conftest import read_jsonl, write_jsonl
from tests.simulated import Clock

CLAUDE = "anthropic/claude-sonnet-4"
EPHEMERAL = {"type": "ephemeral"}


def system(n: int, chars: int = 6000) -> dict[str, Any]:
    return {"role": "system", "content": f"Rules {n}. " + "x" * chars}


def line(n: int, question: str = "what?", model: str = CLAUDE, **more: Any) -> dict[str, Any]:
    return {"model": model, "messages": [system(n), {"role": "user", "content": question}], **more}


# -- the markers ------------------------------------------------------------------------------


def test_a_claude_line_gets_cache_control_on_its_long_system_prompt_and_the_line_is_untouched() -> None:
    body = line(1)
    before = copy.deepcopy(body)
    marked = mark(body, CLAUDE)
    assert body == before  # (the line's own objects are not changed)
    assert marked["messages"][0]["content"] == [
        {"type": "text", "text": body["messages"][0]["content"], "cache_control": EPHEMERAL}
    ]
    assert marked["messages"][1] == body["messages"][1]  # the question, which varies: unmarked
    assert "prompt_cache_key" not in marked


def test_parts_the_last_block_before_the_question_is_marked_an_image_too() -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    body = {
        "model": CLAUDE,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "y" * 8000},
                    image,
                    {"type": "text", "text": "In French?"},
                ],
            }
        ],
    }
    parts = mark(body, CLAUDE)["messages"][0]["content"]
    assert parts[0] == body["messages"][0]["content"][0]
    assert parts[1] == {**image, "cache_control": EPHEMERAL}
    assert "cache_control" not in parts[2]


def test_tools_count_in_the_prefix_and_stay_unmarked() -> None:
    tools = [{"type": "function", "function": {"name": "f", "description": "z" * 6000}}]
    body = {"model": CLAUDE, "tools": tools, "messages": [system(1, 40), {"role": "user", "content": "hi"}]}
    marked = mark(body, CLAUDE)
    assert marked["tools"] == tools
    assert marked["messages"][0]["content"][0]["cache_control"] == EPHEMERAL
    # for an OpenAI model, the tools alone make a key: lines that share them share it
    one, two = (
        {"model": "gpt-4o", "tools": tools, "messages": [{"role": "user", "content": q}]} for q in "ab"
    )
    assert prefix_key(one) == prefix_key(two) is not None
    assert mark(one, "gpt-4o")["prompt_cache_key"] == prefix_key(one)


def test_a_line_s_own_markers_are_kept_never_doubled_and_never_past_four() -> None:
    body = line(1)
    own = {**body, "messages": [{**body["messages"][0], "cache_control": EPHEMERAL}, body["messages"][1]]}
    assert mark(own, CLAUDE) is own
    parted = mark(body, CLAUDE)
    assert mark(parted, CLAUDE) is parted  # marked once only
    four = {
        **body,
        "messages": [
            *(
                {"role": "user", "content": [{"type": "text", "text": "a", "cache_control": EPHEMERAL}]}
                for _ in range(4)
            ),
            *body["messages"],
        ],
    }
    assert mark(four, CLAUDE) is four


def test_short_prefixes_and_lone_messages_go_as_they_are() -> None:
    short = {"model": CLAUDE, "messages": [system(1, 400), {"role": "user", "content": "hi"}]}
    lone = {"model": "gpt-4o", "messages": [{"role": "user", "content": "z" * 20000}]}
    assert mark(short, CLAUDE) is short
    assert mark({**short, "model": "gpt-4o"}, "gpt-4o") == {**short, "model": "gpt-4o"}
    assert mark(lone, "gpt-4o") is lone


def test_other_models_get_a_prompt_cache_key_one_a_prefix_and_a_line_s_own_is_kept() -> None:
    a, b, c = (mark(line(n, q, "gpt-4o"), "gpt-4o") for n, q in ((1, "one"), (1, "two"), (2, "one")))
    assert a["prompt_cache_key"] == b["prompt_cache_key"] != c["prompt_cache_key"]
    assert mark(line(1, "one", "gpt-4.1"), "gpt-4.1")["prompt_cache_key"] != a["prompt_cache_key"]
    assert "cache_control" not in orjson.dumps(a).decode()
    own = line(1, "one", "gpt-4o", prompt_cache_key="mine")
    assert mark(own, "gpt-4o") is own


def test_a_local_image_counts_by_its_file_not_its_place_in_the_line() -> None:
    def photo(question: str) -> dict[str, Any]:
        url = {"type": "image_url", "image_url": {"url": "pipeline-image:abc:0"}}
        return {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": [url, {"type": "text", "text": question}]}],
        }

    cat, dog = {"pipeline-image:abc:0": ("cat.png", 1500)}, {"pipeline-image:abc:0": ("dog.png", 1500)}
    assert prefix_key(photo("in French"), images=cat) == prefix_key(photo("in German"), images=cat)
    assert prefix_key(photo("in French"), images=cat) != prefix_key(photo("in French"), images=dog)


# -- a run's lines, marked where an earlier line's prefix ran as far (`Marks`) ---------------


def prefilled(n: int) -> dict[str, Any]:
    """A line whose own part is not its last block: its document, then a prefill."""
    document = {"role": "user", "content": f"Document {n}. " + "y" * 2000}
    return {"model": CLAUDE, "messages": [system(1), document, {"role": "assistant", "content": "{"}]}


def test_prefilled_lines_write_their_shared_system_prompt_once_not_each_its_own_document() -> None:
    def served(marker: Any) -> list[Served]:
        cache = PrefixCache(size=8, ttl=300.0, min_tokens=1024, clock=Clock())
        return [cache.serve(marker(prefilled(n), CLAUDE)) for n in range(6)]

    # One line at a time, each marked its document (its prefix's last block): each wrote it,
    # with the system prompt, at 1.25x, and none read anything.
    assert all(s.cached == 0 and s.written > 1500 for s in served(mark))
    # A run's lines: the first goes unmarked, the second writes the system prompt, the rest read it.
    first, second, *rest = served(Marks())
    assert first == Served(0, 0)
    assert second.cached == 0
    assert 1500 <= second.written < 1600
    assert rest == [Served(second.written, 0)] * 4


def test_a_prefix_no_other_line_shares_is_never_marked_one_that_others_share_is() -> None:
    def unique(n: int) -> dict[str, Any]:  # a short instruction, then the line's own long document
        parts = [
            {"type": "text", "text": f"Document {n}. " + "y" * 8000},
            {"type": "text", "text": "Sum up."},
        ]
        return {"model": CLAUDE, "messages": [system(1, 100), {"role": "user", "content": parts}]}

    marks = Marks()
    assert all(marks(body, CLAUDE) is body for body in map(unique, range(5)))
    # nor keyed for OpenAI: a key of its own would route each line apart from the others
    assert all(marks(body, "gpt-4o") is body for body in map(unique, range(5)))
    keys = [marks({**prefilled(n), "model": "gpt-4o"}, "gpt-4o").get("prompt_cache_key") for n in range(4)]
    assert keys[0] is None
    assert keys[1] == keys[2] == keys[3] is not None  # (the system prompt's, not each document's)
    tools = [{"type": "function", "function": {"name": "f", "description": "z" * 6000}}]
    alone = [{"model": "gpt-4o", "tools": tools, "messages": [{"role": "user", "content": q}]} for q in "abc"]
    first, *rest = [marks(body, "gpt-4o").get("prompt_cache_key") for body in alone]
    assert first is None
    assert rest[0] == rest[1] is not None  # (the tools alone make the prefix)

    def photo(language: str) -> dict[str, Any]:
        parts = [
            {"type": "image_url", "image_url": {"url": "pipeline-image:abc:0"}},
            {"type": "text", "text": language},
        ]
        return {"model": CLAUDE, "messages": [{"role": "user", "content": parts}]}

    cat = {"pipeline-image:abc:0": ("cat.png", 1500)}
    marked = [marks(photo(language), CLAUDE, cat) for language in ("French", "German", "Dutch")]
    assert "cache_control" not in orjson.dumps(marked[0]).decode()
    assert [m["messages"][0]["content"][0].get("cache_control") for m in marked[1:]] == [EPHEMERAL] * 2
    small = Marks(size=3)
    for n in range(10):
        small(line(n, model=CLAUDE), CLAUDE)
    assert len(small.seen) == 3  # (a bounded memory)


TEXT = st.text(alphabet="ab c", max_size=12).map(lambda t: t * 300)
PART = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, TEXT),
    st.just({"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}),
    st.builds(lambda t: {"type": "text", "text": t, "cache_control": EPHEMERAL}, TEXT),
)
MESSAGE = st.builds(
    lambda role, content: {"role": role, "content": content},
    st.sampled_from(["system", "user", "assistant"]),
    st.one_of(TEXT, st.lists(PART, min_size=1, max_size=3)),
)
BODY = st.builds(
    lambda model, messages, key: {"model": model, "messages": messages, **key},
    st.sampled_from([CLAUDE, "claude-3-5-haiku", "gpt-4o", "openrouter/google/gemini-2.5-flash"]),
    st.lists(MESSAGE, min_size=1, max_size=5),
    st.sampled_from([{}, {"prompt_cache_key": "mine"}]),
)


def _added(marked: dict[str, Any], body: dict[str, Any]) -> int:
    """The markers `mark` added to `body`, asserting it changed nothing else: a marker on a
    part (a string content made its one part for it), or a prompt_cache_key of its own."""
    new = marked.keys() - body.keys()
    assert new <= {"prompt_cache_key"}
    assert {k: marked[k] for k in body if k != "messages"} == {
        k: v for k, v in body.items() if k != "messages"
    }
    added = len(new)
    for now, then in zip(marked["messages"], body["messages"], strict=True):
        assert {k: v for k, v in now.items() if k != "content"} == {
            k: v for k, v in then.items() if k != "content"
        }
        if now["content"] == then["content"]:
            continue
        parts = then["content"]
        parts = [{"type": "text", "text": parts}] if isinstance(parts, str) else parts
        assert len(now["content"]) == len(parts)
        for a, b in zip(now["content"], parts, strict=True):
            if a != b:
                assert "cache_control" not in b
                assert a == {**b, "cache_control": EPHEMERAL}
                added += 1
    return added


@settings(max_examples=100)  # (bodies of some thousands of characters, hashed twice)
@given(BODY)
def test_property_a_marked_body_differs_only_by_markers_and_keeps_its_answer_key(
    body: dict[str, Any],
) -> None:
    before = copy.deepcopy(body)
    marked = mark(body, body["model"])
    assert body == before
    added = _added(marked, body)
    assert added <= 1
    if added and "prompt_cache_key" not in marked:  # a breakpoint: never past four
        assert orjson.dumps(marked).count(b"cache_control") <= 4
    assert request_key(orjson.dumps(marked)) == request_key(orjson.dumps(body))
    assert prefix_key(marked) == prefix_key(body)


@settings(max_examples=100)  # (each example up to eight lines of some thousands of characters)
@given(st.lists(BODY, min_size=1, max_size=4))
def test_property_a_run_s_marks_differ_from_its_lines_only_by_markers(bodies: list[dict[str, Any]]) -> None:
    marks = Marks()
    for body in [*bodies, *bodies]:
        before = copy.deepcopy(body)
        marked = marks(body, body["model"])
        assert body == before
        assert _added(marked, body) <= 1
        assert request_key(orjson.dumps(marked)) == request_key(orjson.dumps(body))
        if marked != body and "prompt_cache_key" not in marked:  # a breakpoint: never past four
            assert orjson.dumps(marked).count(b"cache_control") <= 4


# -- counted and priced -------------------------------------------------------------------------


def _answer(cached: int, written: int, **usage: Any) -> dict[str, Any]:
    return {
        "model": CLAUDE,
        "choices": [],
        "usage": {
            "prompt_tokens": 10_000,
            "completion_tokens": 100,
            "prompt_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
            **usage,
        },
    }


def test_cached_and_written_tokens_are_priced_at_their_own_prices_anthropic_writes_at_1_25x() -> None:
    prices = check_prices(
        "job.toml",
        {CLAUDE: {"prompt": 3, "completion": 15, "cached": 0.3}, "gpt-4o": {"prompt": 2.5, "completion": 10}},
    )
    assert prices[CLAUDE] == Price(3.0, 15.0, 0.3, 3.75)
    assert prices["gpt-4o"] == Price(2.5, 10.0, None, None)  # the prompt price, as before
    cost, source = answer_cost(_answer(8000, 1000), prices, CLAUDE)
    assert source == "price table"
    assert cost == pytest.approx((1000 * 3 + 8000 * 0.3 + 1000 * 3.75 + 100 * 15) / 1e6)
    # Anthropic's own names, as a compatible endpoint passes them on
    native = _answer(0, 0, cache_read_input_tokens=8000, cache_creation_input_tokens=1000)
    assert answer_cost(native, prices, CLAUDE) == (cost, "price table")
    usage = Usage()
    usage.add_body(native, CLAUDE)
    usage.add_body(_answer(500, 0, cache_creation_input_tokens=700), CLAUDE)  # (LiteLLM's mix)
    assert (usage.models[CLAUDE].cached_tokens, usage.models[CLAUDE].cache_write_tokens) == (8500, 1700)
    half = check_prices("job.toml", {"batch": 0.5, CLAUDE: {"prompt": 3, "completion": 15, "cached": 0.3}})
    from pipeline.account.cost import tier_prices

    assert tier_prices(half, "batch")[CLAUDE] == Price(1.5, 7.5, 0.15, 1.875)


def test_a_stated_batch_prompt_price_carries_the_cached_and_write_prices_down_with_it() -> None:
    # Anthropic's batch: half of every price, its writes 1.25x and its reads a tenth of the
    # batch prompt price; a table that states the batch's prompt price, and no `batch` share,
    # priced a batch's writes at the synchronous $3.75 (2.5x its $1.50) and reads at $0.30.
    from pipeline.account.cost import tier_prices

    entry = {"prompt": 3, "completion": 15, "cached": 0.3, "batch_prompt": 1.5, "batch_completion": 7.5}
    batch = tier_prices(check_prices("job.toml", {CLAUDE: entry}), "batch")[CLAUDE]
    assert batch == Price(1.5, 7.5, 0.15, 1.875)
    stated = tier_prices(check_prices("job.toml", {CLAUDE: {**entry, "batch_cache_write": 2}}), "batch")
    assert stated[CLAUDE] == Price(1.5, 7.5, 0.15, 2.0)  # (one the table states is kept)


def test_a_budget_holds_back_what_a_request_costs_when_it_writes_its_whole_prompt() -> None:
    # A claude request whose prompt is all written to the cache costs 1.25x its prompt: a
    # budget that held back its prompt at the prompt price let in-flight requests pass the cap.
    from pipeline.account.cost import Budget
    from pipeline.job import Request

    prices = check_prices("job.toml", {CLAUDE: {"prompt": 3, "completion": 15}})
    request = Request("a", 1, b"{}", None, CLAUDE, False, 10_000, 10_000, 100, True, None)
    written = {**_answer(0, 10_000), "usage": {**_answer(0, 10_000)["usage"], "completion_tokens": 100}}
    cost, _ = answer_cost(written, prices, CLAUDE)
    assert cost == pytest.approx((10_000 * 3.75 + 100 * 15) / 1e6)
    assert Budget(1.0, Usage(), prices).worst_case(request) == pytest.approx(cost)


def test_old_usage_states_load_and_merged_shards_add_the_new_counts() -> None:
    old = {"models": {CLAUDE: {"requests": 2, "prompt_tokens": 10, "cached_tokens": 4}}}
    usage = Usage.from_state(old)
    assert usage.models[CLAUDE].cache_write_tokens == 0
    other = Usage()
    other.add_body(_answer(8000, 1000), CLAUDE)
    other.add_cache(CLAUDE, 0.02, 0.001)
    usage.add(Usage.from_state(other.state()), label="shard-2")
    m = usage.models[CLAUDE]
    assert (m.cached_tokens, m.cache_write_tokens, m.cache_saved, m.cache_write_extra) == (
        8004,
        1000,
        0.02,
        0.001,
    )


def test_a_run_with_no_cached_token_shows_nothing_new(tmp_path: Path) -> None:
    usage = Usage()
    usage.add_body({"model": "m", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}})
    doc = usage_document(usage, state={"results": 1}, folder=tmp_path)
    assert "Prompt cache" not in markdown(doc)
    assert "Prompt cache" not in html_report(doc)
    usage.add_body(_answer(8000, 0), CLAUDE)
    usage.add_cache(CLAUDE, None, 0.0)
    said = markdown(usage_document(usage, state={"results": 2}, folder=tmp_path))
    assert "## Prompt cache" in said
    assert f"| {CLAUDE} | 10,000 | 8,000 | 80.0% | 0 | not known | – | not known |" in said
    assert "1 answer(s) read from the cache of a model [prices] gives no `cached` price" in said


def test_a_cache_written_and_seldom_read_shows_its_net_loss_signed(tmp_path: Path) -> None:
    from pipeline.account.books import Books
    from pipeline.job import Reply, Request, Success

    prices = check_prices("job.toml", {CLAUDE: {"prompt": 3, "completion": 15, "cached": 0.3}})
    usage = Usage()
    books = Books(usage, prices)
    request = Request("a", 1, b"{}", None, CLAUDE, False, 10_000, 10_000, 100, True, None)
    # two lines wrote 9,000 tokens each, one read 1,000 of them: $0.0135 extra, $0.0027 saved
    answers = [_answer(0, 9000), _answer(0, 9000), _answer(1000, 0)]
    books.kept([Success(request, Reply(body, None), 1) for body in answers])
    said = markdown(usage_document(usage, state={"results": 3}, folder=tmp_path))
    assert f"| {CLAUDE} | 30,000 | 1,000 | 3.3% | 18,000 | $0.0027 | $0.0135 | -$0.0108 |" in said
    assert "The prompt cache cost $0.0108 more than it saved" in said
    assert "$-" not in said


# -- end to end, on the mock's prompt cache ------------------------------------------------------


@pytest.mark.parametrize("stated", [True, False], ids=["server cost", "price table"])
async def test_a_claude_job_writes_then_reads_and_the_report_says_the_share_and_savings(
    mock: Any, make_settings: Any, tmp_path: Path, stated: bool
) -> None:
    rows = [{"custom_id": f"l{i}", **line(i % 2, f"question {i}")} for i in range(10)]
    job = tmp_path / "job.toml"
    job.write_text(
        f'prompt_cache = true\n[prices."{CLAUDE}"]\nprompt = 0.5\ncompletion = 1.5\ncached = 0.125\n'
    )
    async with mock(prefix_cache=8, cost=stated) as (url, server):
        await pipeline.run(
            make_settings(url, job=job, input=write_jsonl(tmp_path / "in.jsonl", rows), concurrency=1)
        )
        served = server.state.stats()["served"]
    doc = orjson.loads((tmp_path / "out" / "usage.json").read_bytes())
    cache = doc["models"][CLAUDE]["prompt_cache"]
    # two prefixes: each written once, then read by the lines after it
    assert cache["cache_write_tokens"] == served["cache_write_tokens"] > 0
    assert cache["cached_tokens"] == served["cached_tokens"] > 0
    assert cache["share_cached"] == pytest.approx(served["cached_tokens"] / served["prompt_tokens"], abs=1e-4)
    assert cache["saved"] == pytest.approx(served["cached_tokens"] * (0.5 - 0.125) / 1e6)
    assert cache["write_extra"] == pytest.approx(served["cache_write_tokens"] * (0.625 - 0.5) / 1e6)
    fresh = served["prompt_tokens"] - served["cached_tokens"] - served["cache_write_tokens"]
    spent = (
        fresh * 0.5
        + served["cached_tokens"] * 0.125
        + served["cache_write_tokens"] * 0.625
        + served["completion_tokens"] * 1.5
    ) / 1e6
    assert doc["cost"]["total"] == pytest.approx(spent)
    if stated:
        assert doc["cost"]["total"] == pytest.approx(served["cost"])
        assert doc["cost"]["source"] == "server"
    else:
        assert doc["cost"]["source"] == "price table"
    report = (tmp_path / "out" / "report.md").read_text()
    share = f"{cache['share_cached']:.1%}"
    assert f"| {CLAUDE} | {served['prompt_tokens']:,} | {served['cached_tokens']:,} | {share} |" in report
    assert "Prompt cache" in (tmp_path / "out" / "report.html").read_text()


def test_the_flag_turns_it_on_and_the_job_file_key_too(tmp_path: Path) -> None:
    from pipeline.parser import parser, settings_from_args

    args = parser("run").parse_args(["run", "--input", "in.jsonl", "--output", "out", "--prompt-cache"])
    assert settings_from_args(args).prompt_cache is True
    args = parser("run").parse_args(["run", "--input", "in.jsonl", "--output", "out"])
    assert settings_from_args(args).prompt_cache is False


ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5) | st.just("z" * 5000),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(
            st.sampled_from(["type", "text", "cache_control", "image_url", "url"]), inner, max_size=3
        )
    ),
    max_leaves=8,
)


@settings(max_examples=150)
@given(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["system", "user"])}, optional={"content": ANY, "cache_control": ANY}
        ),
        min_size=1,
        max_size=4,
    ),
    st.sampled_from([CLAUDE, "gpt-4o"]),
    st.dictionaries(st.sampled_from(["tools", "response_format", "prompt_cache_key"]), ANY, max_size=2),
)
def test_property_any_body_a_line_may_hold_is_marked_or_left_never_a_crash(
    messages: list[dict[str, Any]], model: str, more: dict[str, Any]
) -> None:
    body = {"model": model, "messages": messages, **more}
    before = copy.deepcopy(body)
    marked = mark(body, model)
    assert body == before
    assert prefix_key(marked) == prefix_key(body)


async def test_a_claude_job_grouped_writes_each_prefix_once_and_the_rest_read(
    mock: Any, make_settings: Any, tmp_path: Path
) -> None:
    # Two long system prompts, ten lines each, read together, short lines keeping the workers
    # busy around them. A prefix's first line goes unmarked (it writes nothing): the second,
    # the first marked, goes alone and writes; the rest, held for its answer, read. (Held for
    # the unmarked first line's answer, the rest went at once after it, and each wrote.)
    def short(n: int) -> dict[str, Any]:
        return {"custom_id": f"s{n}", "model": CLAUDE, "messages": [{"role": "user", "content": "hi"}]}

    rows = [short(n) for n in range(8)]
    rows += [{"custom_id": f"p{i}", **line(i % 2, f"question {i}")} for i in range(20)]
    rows += [short(n) for n in range(8, 208)]
    job = tmp_path / "job.toml"
    job.write_text("prompt_cache = true\n")
    async with mock(prefix_cache=8, latency=0.01) as (url, _server):
        summary = await pipeline.run(
            make_settings(url, job=job, input=write_jsonl(tmp_path / "in.jsonl", rows), concurrency=4)
        )
    assert summary.succeeded == len(rows)
    details = {
        r["custom_id"]: r["response"]["body"]["usage"]["prompt_tokens_details"]
        for r in read_jsonl(tmp_path / "out" / "results.jsonl")
        if r["custom_id"].startswith("p")
    }
    writes = sorted(i for i, d in details.items() if d["cache_write_tokens"])
    reads = [i for i, d in details.items() if d["cached_tokens"]]
    assert writes == ["p2", "p3"]  # each prompt's first marked line, once
    assert len(reads) == 16  # every line after it


async def test_a_claude_job_without_prompt_cache_goes_in_input_order(
    mock: Any, make_settings: Any, tmp_path: Path
) -> None:
    # Unmarked, Anthropic's models cache nothing: holding a line for its kin would gain nothing.
    rows = [{"custom_id": f"p{i}", **line(i % 2, f"question {i}")} for i in range(8)]
    async with mock(prefix_cache=8) as (url, server):
        await pipeline.run(make_settings(url, rows, concurrency=1))
        sent = [body["messages"][-1]["content"] for body in server.state.received]
    assert sent == [f"question {i}" for i in range(8)]
