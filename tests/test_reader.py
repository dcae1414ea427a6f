"""The three line shapes, stable ids, and what a bad line turns into."""

from __future__ import annotations

import gzip
import re
import tracemalloc
from pathlib import Path
from unittest import mock

import orjson
import pytest

from pipeline.errors import InputError, SettingsError
from pipeline.input import jsonl
from pipeline.input.line import LineParser
from pipeline.input.reader import stable_id
from pipeline.input.source import count_lines, lines
from pipeline.job import Request
from pipeline.output import ledger as ledger_module
from pipeline.output.ledger import Ledger
from pipeline.settings import build


def parser(tmp_path: Path, job: str | None = None, **flags: object) -> LineParser:
    job_path = None
    if job is not None:
        job_path = tmp_path / "job.toml"
        job_path.write_text(job)
    flags.setdefault("input", str(tmp_path / "in.jsonl"))
    flags.setdefault("output", str(tmp_path / "out"))
    return LineParser(build(job_path, **flags), exact_tokens=True)


def sent(r: Request) -> dict:
    return jsonl.loads(r.payload)  # lossless: integers beyond 64 bits stay integers


def request(p: LineParser, row: object, *, line: int = 1) -> Request:
    raw = row if isinstance(row, bytes) else orjson.dumps(row)
    parsed = p.parse(raw)
    return p.request(parsed, custom_id=parsed.custom_id or stable_id(raw), line=line)


def test_a_batch_api_line(tmp_path: Path) -> None:
    row = {
        "custom_id": "r1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10},
        "metadata": {"k": 1},
    }
    r = request(parser(tmp_path), row)
    assert r.custom_id == "r1"
    assert sent(r) == row["body"]
    assert orjson.loads(r.payload) == row["body"]
    assert r.metadata == {"k": 1}
    assert r.max_completion_tokens == 10


@pytest.mark.parametrize(
    "row",
    [
        {
            "custom_id": "a",
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        },
        {
            "custom_id": "t",
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "x"}],
        },
        {"model": "m", "messages": [{"role": "user", "content": "hi", "name": "x"}], "custom_id": "b"},
    ],
)
def test_a_line_of_another_shape_is_parsed_once_and_read_whole(tmp_path: Path, row: dict) -> None:
    """A line the one pass leaves to the whole reading (content parts, tools, a message with a
    name) is read from the value the one pass parsed: a megabyte's image part parsed twice cost a
    quarter more a line. Its id and body come out as the line wrote them."""
    raw = orjson.dumps(row)
    p = parser(tmp_path)
    with mock.patch("orjson.loads", wraps=orjson.loads) as loads:
        parsed = p.parse(raw)
    assert loads.call_count == 1
    r = p.request(parsed, custom_id=parsed.custom_id or stable_id(raw), line=1)
    assert r.custom_id == str(row["custom_id"])
    assert sent(r) == {k: v for k, v in row.items() if k != "custom_id"}


def test_a_bare_body_keeps_every_parameter_but_custom_id(tmp_path: Path) -> None:
    row = {"custom_id": "x", "model": "m", "messages": [{"role": "user", "content": "hi"}], "zz_unknown": [1]}
    r = request(parser(tmp_path), row)
    assert r.custom_id == "x"
    assert sent(r) == {"model": "m", "messages": [{"role": "user", "content": "hi"}], "zz_unknown": [1]}


def test_request_defaults_merge_and_the_line_wins(tmp_path: Path) -> None:
    p = parser(tmp_path, '[request]\nmodel = "default/m"\ntemperature = 0.2\nmax_tokens = 50\n')
    r = request(p, {"messages": [{"role": "user", "content": "a"}], "temperature": 0.9})
    assert sent(r)["model"] == "default/m"
    assert sent(r)["temperature"] == 0.9
    assert sent(r)["max_tokens"] == 50


def test_model_flag_is_the_default_model(tmp_path: Path) -> None:
    p = parser(tmp_path, model="flag/model")
    assert sent(request(p, {"messages": [{"role": "user", "content": "a"}]}))["model"] == "flag/model"
    assert (
        sent(request(p, {"model": "line/m", "messages": [{"role": "user", "content": "a"}]}))["model"]
        == "line/m"
    )


def test_a_line_without_any_model_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no model") as e:
        request(parser(tmp_path), {"messages": [{"role": "user", "content": "a"}]})
    assert e.value.field == "model"


def test_stable_ids_are_the_same_on_every_run_and_differ_between_lines() -> None:
    a = b'{"messages": [{"role": "user", "content": "a"}]}\n'
    b = b'{"messages": [{"role": "user", "content": "b"}]}\n'
    assert stable_id(a) == stable_id(a.rstrip())
    assert stable_id(a) != stable_id(b)
    assert stable_id(a).startswith("line-")


def test_streaming_requests_ask_for_usage(tmp_path: Path) -> None:
    r = request(parser(tmp_path, model="m"), {"messages": [{"role": "user", "content": "a"}], "stream": True})
    assert r.stream
    assert sent(r)["stream_options"] == {"include_usage": True}
    kept = {
        "messages": [{"role": "user", "content": "a"}],
        "stream": True,
        "stream_options": {"include_usage": False},
    }
    assert sent(request(parser(tmp_path, model="m"), kept))["stream_options"] == {"include_usage": False}


@pytest.mark.parametrize(
    ("raw", "message", "field"),
    [
        (b"not json", "not valid JSON", None),
        (b'{"messages": [', "not valid JSON", None),
        (b"[1, 2]", "not a JSON object", None),
        (b'"text"', "not a JSON object", None),
        (b'{"model": "m"}', "no 'messages'", "messages"),
        (b'{"model": "m", "messages": []}', "'messages' is empty", "messages"),
        (b'{"model": "m", "messages": "hi"}', "'messages' is a string", "messages"),
        (b'{"model": "m", "messages": [1]}', "'messages[0]' is a number", "messages[0]"),
        (b'{"model": "m", "messages": [{"content": "x"}]}', "'messages[0].role'", "messages[0].role"),
        (
            b'{"model": 5, "messages": [{"role": "user", "content": "x"}]}',
            "'model' must be a string",
            "model",
        ),
        (
            b'{"model": "m", "max_tokens": "10", "messages": [{"role": "user"}]}',
            "'max_tokens' must be a whole number",
            "max_tokens",
        ),
        (
            b'{"model": "m", "stream": "yes", "messages": [{"role": "user"}]}',
            "'stream' must be true or false",
            "stream",
        ),
        (
            b'{"model": "m", "custom_id": "", "messages": [{"role": "user"}]}',
            "custom_id must be a non-empty string",
            "custom_id",
        ),
        (b'{"custom_id": "a", "url": "/v1/embeddings", "body": {}}', "only /v1/chat/completions", "url"),
        (b'{"custom_id": "a", "url": "/v1/chat/completions", "body": []}', "'body' is an array", "body"),
        (
            b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {"model": "m"}}',
            "no 'body.messages'",
            "body.messages",
        ),
        (b'{"model": "m", "messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8", None),
    ],
)
def test_bad_lines_say_what_is_wrong(tmp_path: Path, raw: bytes, message: str, field: str | None) -> None:
    with pytest.raises(InputError, match=re.escape(message)) as e:
        request(parser(tmp_path), raw)
    assert e.value.field == field


# (the least below -2**63 has 19 digits, and orjson read it as a float: -9.223372036854776e18)
@pytest.mark.parametrize("number", [123456789012345678901234567890, -9223372036854775809, -(10**19) + 1])
@pytest.mark.parametrize("text", ["x", "x " * 35_000])  # (a line past 64 KiB is scanned by slices)
def test_integers_beyond_64_bits_still_pass_through(tmp_path: Path, number: int, text: str) -> None:
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "%s"}], "seed_big": %d}' % (
        text.encode(),
        number,
    )
    r = request(parser(tmp_path), raw)
    assert sent(r)["seed_big"] == number
    assert type(sent(r)["seed_big"]) is int


def test_integers_beyond_64_bits_in_tools_and_response_format_are_estimated(tmp_path: Path) -> None:
    # The token estimate wrote these with orjson, which refuses them: a TypeError ended the run.
    big = 2**64 + 1
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"maximum": big}}}]
    schema = {"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": -big}}}
    message = {"role": "assistant", "content": "x", "tool_calls": [{"id": big}]}
    row = {"model": "m", "messages": [message], "tools": tools, "response_format": schema}
    r = request(parser(tmp_path), jsonl.dumps(row))
    assert sent(r)["tools"] == tools
    assert sent(r)["response_format"] == schema
    assert r.prompt_tokens > 20


@pytest.mark.parametrize("number", [b"1", b"12345678901234567890"])  # orjson's way, and json's
@pytest.mark.parametrize("kind", ["list", "object"])
def test_a_line_nested_a_thousand_levels_deep_is_an_input_error(
    tmp_path: Path, number: bytes, kind: str
) -> None:
    # The standard library's parser ran out of stack on it (RecursionError): a crash.
    inner = b"[" * 1000 + number + b"]" * 1000 if kind == "list" else b'{"a":' * 1000 + number + b"}" * 1000
    raw = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": ' + inner + b"}"
    with pytest.raises(InputError, match="nested more than 200 levels deep") as e:
        request(parser(tmp_path), raw)
    assert e.value.code == "too_deep"


def test_the_shortest_text_nested_too_deep_is_found_and_one_level_less_is_not() -> None:
    # A text too short to hold 201 pairs of brackets is not counted: the shortest that does
    # (402 bytes) must still be walked.
    for depth, deep in ((201, True), (200, False)):
        for opening, closing in ((b"[", b"]"), (b'{"":', b"}")):
            raw = opening * depth + b"1" + closing * depth
            assert jsonl.too_deep(raw, orjson.loads(raw)) is deep
    with pytest.raises(jsonl.TooDeep):
        jsonl.parse(b"[" * 201 + b"]" * 201)


def test_a_line_nested_as_deep_as_can_be_written_again_goes_through(tmp_path: Path) -> None:
    deep: object = 1
    for _ in range(198):
        deep = [deep]
    row = {"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": deep, "tools": [deep]}
    for raw in (orjson.dumps(row), orjson.dumps({**row, "seed": 12345678901234567890})):
        r = request(parser(tmp_path), raw)
        assert sent(r)["tools"] == [deep]
        assert r.metadata == deep


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400"])
def test_numbers_json_does_not_allow_are_refused_whichever_way_the_line_is_read(
    tmp_path: Path, literal: bytes
) -> None:
    # orjson refuses them; the standard library (for lines with a 20-digit number) let them
    # through, and the body sent held null where the line said NaN.
    for seed in (b"1", b"12345678901234567890"):
        raw = (
            b'{"model": "m", "seed": '
            + seed
            + b', "temperature": '
            + literal
            + b', "messages": [{"role": "user"}]}'
        )
        with pytest.raises(InputError, match="not valid JSON") as e:
            request(parser(tmp_path), raw)
        assert e.value.code == "not_json"


def test_an_integer_too_long_to_print_is_an_input_error(tmp_path: Path) -> None:
    raw = b'{"model": "m", "seed": ' + b"9" * 5000 + b', "messages": [{"role": "user"}]}'
    with pytest.raises(InputError, match="a number of 5,000 digits"):
        request(parser(tmp_path), raw)


def test_stream_options_that_are_not_an_object_are_an_input_error(tmp_path: Path) -> None:
    # The reader adds include_usage to them: `{**True}` was a TypeError, and a crash.
    with pytest.raises(InputError, match="'stream_options' must be an object, not True") as e:
        request(
            parser(tmp_path, model="m"),
            {"messages": [{"role": "user"}], "stream": True, "stream_options": True},
        )
    assert e.value.field == "stream_options"


def test_a_message_quotes_a_bad_value_short(tmp_path: Path) -> None:
    # repr() of these is megabytes, or fails (an integer past 4,300 digits: ValueError).
    deep: object = "x" * 1_000_000
    for _ in range(150):
        deep = [deep]
    for value in (deep, "y" * 1_000_000, [10**4000]):
        row = {"model": "m", "messages": [{"role": "user"}], "max_tokens": value}
        with pytest.raises(InputError, match="'max_tokens' must be a whole number, not") as e:
            request(parser(tmp_path), jsonl.dumps(row))
        assert len(e.value.message) < 300


def test_what_no_check_foresaw_fails_the_line_not_the_run(tmp_path: Path) -> None:
    p = parser(tmp_path, model="m")

    def broken(*_: object) -> tuple[int, int]:
        raise ZeroDivisionError("an estimate gone wrong")

    p.estimator.counts = broken  # type: ignore[method-assign]
    with pytest.raises(InputError, match="ZeroDivisionError: 'an estimate gone wrong'") as e:
        request(p, {"messages": [{"role": "user", "content": "a"}]})
    assert e.value.code == "reader_error"
    assert "a bug in pipeline worth reporting" in e.value.message


def test_lines_are_read_one_by_one_from_plain_and_gzip(tmp_path: Path) -> None:
    data = b'{"a": 1}\n\n{"b": 2}'
    plain = tmp_path / "x.jsonl"
    plain.write_bytes(data)
    zipped = tmp_path / "x.jsonl.gz"
    zipped.write_bytes(gzip.compress(data))
    for path in (plain, zipped):
        assert [(n, raw.strip()) for n, raw in lines(path)] == [(1, b'{"a": 1}'), (2, b""), (3, b'{"b": 2}')]
        assert count_lines(path) == 3


def test_a_missing_input_is_a_settings_error(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="not found"):
        list(lines(tmp_path / "nope.jsonl"))


def test_token_estimates_count_prompt_and_worst_case_reply(tmp_path: Path) -> None:
    row = {
        "model": "m",
        "messages": [{"role": "user", "content": "hello world " * 50}],
        "max_tokens": 100,
        "n": 3,
    }
    r = request(parser(tmp_path), row)
    assert 90 <= r.prompt_tokens <= 130
    assert r.max_completion_tokens == 300


@pytest.mark.parametrize("run", ["x" * 20_000, "ACGT" * 5_000, " " * 20_000, "!" * 20_000])
def test_a_long_run_without_a_break_is_counted_in_pieces_the_tokenizer_takes_quickly(run: str) -> None:
    """The tokenizer's merges take time growing with the square of a run's length in pure Python:
    16,000 letters without a space held the event loop 3.5 s. Such a run is encoded in pieces of
    LONG_RUN, and counts close to what the whole run does."""
    from pipeline.input.tokens import LONG_RUN, TokenEstimator

    estimator = TokenEstimator(every=True)
    text = f"a caption: {run} and the end"
    whole = len(estimator._load().encode(text[:4_000], disallowed_special=()))  # (a part: quick enough)
    lengths: list[int] = []
    real = estimator._load().encode
    with mock.patch.object(
        estimator._load(), "encode", lambda t, **k: lengths.append(len(t)) or real(t, **k)
    ):
        tokens = estimator.counts({"messages": [{"role": "user", "content": text}]})[0]
    assert max(lengths) <= LONG_RUN + 16 <= 300  # (the text around the run as it is)
    assert whole * len(text) / 4_000 * 0.9 <= tokens <= whole * len(text) / 4_000 * 1.1 + 20


def test_estimate_mode_counts_every_prompt_exactly(tmp_path: Path) -> None:
    from pipeline.input.tokens import EXACT_FIRST, TokenEstimator

    sampled, every = TokenEstimator(exact=True), TokenEstimator(every=True)
    short = {"messages": [{"role": "user", "content": "a b c d"}]}
    odd = {"messages": [{"role": "user", "content": "antidisestablishmentarianism " * 40}]}
    for _ in range(EXACT_FIRST):
        sampled.prompt_tokens(short)
        every.prompt_tokens(short)
    exact = TokenEstimator(every=True)
    assert every.prompt_tokens(odd) == exact.prompt_tokens(odd)
    assert sampled.prompt_tokens(odd) != exact.prompt_tokens(odd)  # past the sample: a ratio


async def test_workers_answered_at_once_find_their_next_line_waiting(tmp_path: Path) -> None:
    """Workers whose requests are all answered in one pass of the loop (0 ms answers) take a
    whole refill batch a pass: the reader must put that many in a pass, or each worker waits
    for its next line and is woken for it alone (a wait costs an event made, set, awaited)."""
    import anyio
    from anyio.streams.memory import MemoryObjectReceiveStream

    from pipeline.input.reader import ReadCounts, feed
    from pipeline.output.ledger import Ledger
    from pipeline.run.control import Refill

    workers, lines = 256, 4_000
    (tmp_path / "in.jsonl").write_bytes(
        b"".join(
            orjson.dumps({"custom_id": f"r{i}", "model": "m", "messages": [{"role": "user"}]}) + b"\n"
            for i in range(lines)
        )
    )
    p = parser(tmp_path)
    ledger = Ledger(tmp_path / "ledger.sqlite")
    refill = Refill(workers)
    requests_send, requests_recv = anyio.create_memory_object_stream[Request](2 * workers)
    failures_send, failures_recv = anyio.create_memory_object_stream[object](16)
    waits = taken = 0

    async def worker(stream: MemoryObjectReceiveStream[Request]) -> None:
        nonlocal waits, taken
        async with stream:
            while True:
                try:
                    request = stream.receive_nowait()
                except anyio.WouldBlock:
                    waits += 1
                    try:
                        request = await stream.receive()
                    except anyio.EndOfStream:
                        return
                except anyio.EndOfStream:
                    return
                refill.taken(len(request.payload))
                taken += 1
                await anyio.lowlevel.checkpoint()  # answered at once: in the next pass

    try:
        async with anyio.create_task_group() as tg:
            for _ in range(workers):
                tg.start_soon(worker, requests_recv.clone())
            requests_recv.close()
            failures_recv.close()
            await feed(tmp_path / "in.jsonl", p, ledger, requests_send, failures_send, ReadCounts(), refill)
    finally:
        ledger.close()
    assert taken == lines
    # The first pass finds the buffer empty, and the last ones the file read to its end.
    assert waits <= 3 * workers, f"workers waited for a line {waits:,} times in {lines:,} lines"


def test_a_duplicate_id_is_found_whether_its_first_copy_was_noted_in_memory_or_in_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run's first ids are noted in a dict, the rest in SQLite (here two, then the rest). A
    # duplicate is found on either side, and a rollback forgets the ids noted since the last
    # commit on both, as SQLite alone did.
    monkeypatch.setattr(ledger_module, "SEEN_IN_MEMORY", 2)
    for name, kept, lost in [("memory", "a", "b"), ("sqlite", "c", "d")]:
        ledger = Ledger(tmp_path / f"{name}.sqlite")
        try:
            ledger.see("a", 1)
            if name == "sqlite":
                assert [ledger.see(custom_id, n) for n, custom_id in enumerate("bc", 2)] == [None, None]
                assert (ledger.see("a", 4), ledger.see("c", 5)) == (1, 3)
            ledger.commit()
            assert ledger.see(lost, 6) is None
            ledger.rollback()
            assert (ledger.see(kept, 7), ledger.see(lost, 8), ledger.see(lost, 9)) == (
                1 if kept == "a" else 3,
                None,
                8,
            )
        finally:
            ledger.close()


def test_an_id_longer_than_the_ids_held_in_memory_is_not_held_there(tmp_path: Path) -> None:
    # A run's first ids are held in memory up to SEEN_BYTES of them, so that memory stays
    # bounded; a line may be 32 MiB, and an id longer than that bound alone was held all the
    # same, for the whole run. It goes to SQLite (on disk), and is found again there.
    ledger = Ledger(tmp_path / "ledger.sqlite")
    size = ledger_module.SEEN_BYTES + 1
    try:
        tracemalloc.start()
        try:
            assert ledger.see("x" * size, 1) is None
            ledger.commit()
            held, _ = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert held < size // 2, f"{held:,} bytes held after noting an id of {size:,}"
        assert ledger.see("x" * size, 2) == 1
    finally:
        ledger.close()
