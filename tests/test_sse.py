"""Streamed answers assembled into one chat completion, and streams that are not whole."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import orjson
import pytest

from pipeline.errors import MalformedResponse, ProviderError
from pipeline.send.sse import StreamAssembler, assemble


def feed(lines: list[bytes]) -> StreamAssembler:
    a = StreamAssembler()
    for line in lines:
        a.feed_line(line)
    return a


def event(chunk: dict) -> list[bytes]:
    return [b"data: " + orjson.dumps(chunk) + b"\n", b"\n"]


def chunk(delta: dict, *, index: int = 0, finish: str | None = None, **top: object) -> dict:
    return {
        "id": "c1",
        "model": "m",
        **top,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }


def test_content_tool_calls_and_usage_are_joined() -> None:
    lines = [b": OPENROUTER PROCESSING\n", b"\n"]
    lines += event(chunk({"role": "assistant", "content": ""}))
    lines += event(chunk({"content": "Hel"}))
    lines += event(chunk({"content": "lo"}))
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a"'}}
    lines += event(chunk({"tool_calls": [call]}))
    lines += event(chunk({"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}))
    lines += event(chunk({}, finish="tool_calls"))
    lines += event(
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}}
    )
    lines += [b"data: [DONE]\n", b"\n"]
    body = feed(lines).completion()
    assert body["object"] == "chat.completion"
    [choice] = body["choices"]
    assert choice["message"]["content"] == "Hello"
    assert choice["message"]["tool_calls"] == [
        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "get", "arguments": '{"a": 1}'}}
    ]
    assert choice["finish_reason"] == "tool_calls"
    assert body["usage"]["total_tokens"] == 5


def test_several_choices_are_kept_apart() -> None:
    lines = []
    for i in (0, 1):
        lines += event(chunk({"content": f"answer {i}"}, index=i))
        lines += event(chunk({}, index=i, finish="stop"))
    lines += [b"data: [DONE]\n", b"\n"]
    body = feed(lines).completion()
    assert [c["message"]["content"] for c in body["choices"]] == ["answer 0", "answer 1"]


def test_the_first_token_is_noticed_once() -> None:
    a = StreamAssembler()
    seen = [
        a.feed_line(line)
        for line in event(chunk({"role": "assistant", "content": ""}))
        + event(chunk({"content": "x"}))
        + event(chunk({"content": "y"}))
    ]
    assert seen.count(True) == 1


@pytest.mark.parametrize(
    ("lines", "error", "message"),
    [
        (
            [*event(chunk({"content": "x"})), *event(chunk({}, finish="stop"))],
            MalformedResponse,
            "before \\[DONE\\]",
        ),
        (
            [*event(chunk({"content": "x"})), b"data: [DONE]\n", b"\n"],
            MalformedResponse,
            "without a finish_reason",
        ),
        ([b"data: [DONE]\n", b"\n"], MalformedResponse, "without any choice"),
        ([b"data: {not json\n", b"\n"], MalformedResponse, "not JSON"),
        ([*event({"error": {"message": "upstream died", "code": 502}})], ProviderError, "upstream died"),
        ([*event(chunk({}, finish="error"))], ProviderError, "finished with an error"),
    ],
)
def test_a_stream_that_is_not_whole_is_a_failure(lines: list[bytes], error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        feed(lines).completion()


def test_an_error_chunk_with_a_client_error_code_is_not_transient() -> None:
    with pytest.raises(ProviderError) as e:
        feed(event({"error": {"message": "bad request", "code": 400}}))
    assert not e.value.transient
    with pytest.raises(ProviderError) as e:
        feed(event({"error": {"message": "overloaded", "code": 503}}))
    assert e.value.transient


async def pieces(*chunks: bytes) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk


async def test_a_line_of_megabytes_split_anywhere_is_read_whole() -> None:
    content = "".join(chr(ord("a") + i % 26) for i in range(3_000_000))
    data = b"".join(
        [*event(chunk({"content": content})), *event(chunk({}, finish="stop")), b"data: [DONE]\r\n", b"\r\n"]
    )
    cuts = [0, 5, 1_000_000, 1_000_001, len(data) - 3, len(data)]
    firsts: list[int] = []
    body = await assemble(
        pieces(*(data[a:b] for a, b in itertools.pairwise(cuts))),
        first_token=lambda: firsts.append(1),
    )
    assert body["choices"][0]["message"]["content"] == content
    assert firsts == [1]


async def test_a_streamed_answer_of_megabytes_on_one_line_arrives(make_settings, tmp_path) -> None:
    # aiohttp read a stream by lines, and raised LineTooLong (none of the errors the client
    # maps) past twice its 1 MiB buffer: an image in a delta ended the run (exit 70).
    from aiohttp import web

    import pipeline
    from tests.conftest import read_jsonl
    from tests.scripted import answering

    content = "x" * 3_000_000

    async def answer(request: web.Request, body: dict) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for line in [
            *event(chunk({"content": content})),
            *event(chunk({}, finish="stop")),
            b"data: [DONE]\n\n",
        ]:
            await response.write(line)
        return response

    rows = [
        {"custom_id": "big", "model": "m", "stream": True, "messages": [{"role": "user", "content": "draw"}]}
    ]
    async with answering(answer) as url:
        summary = await pipeline.run(make_settings(url, rows))
    assert summary.exit_code == 0
    [result] = read_jsonl(tmp_path / "out/results.jsonl")
    assert result["response"]["body"]["choices"][0]["message"]["content"] == content


async def test_odd_chunks_are_said_short_and_never_a_crash() -> None:
    deep = b"[" * 900 + b"]" * 900
    for bad, message in (
        # (an error so deep, kept, was a line of errors.jsonl no one could write: exit 70)
        (b'{"choices": [{"index": ' + deep + b"}]}", "nested too deep"),
        (b'{"error": {"message": ' + deep + b', "code": 502}}', "nested too deep"),
        (b'{"choices": [{"index": "' + b"9" * 5000 + b'"}]}', "an index that is not a small number"),
        (
            b'{"choices": [{"delta": {"tool_calls": "x"}}]}\n\ndata: {"choices": [{"delta": {"tool_calls": [{}]}}]}',
            "not a chat completion chunk: AttributeError",
        ),
    ):
        with pytest.raises((MalformedResponse, ProviderError), match=message) as e:
            await assemble(pieces(b"data: " + bad + b"\n\n"))
        assert len(e.value.message) < 400


async def test_an_answer_nested_too_deep_to_write_again_is_malformed() -> None:
    # Kept, it made a line of results.jsonl that no run could read back (past orjson's 1,024).
    deep = b'{"a":' * 1000 + b"1" + b"}" * 1000
    end = b'{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": ' + deep + b"}"
    with pytest.raises(MalformedResponse, match="nested too deep"):
        await assemble(
            pieces(*event(chunk({"content": "x"})), b"data: " + end + b"\n\n", b"data: [DONE]\n\n")
        )


@pytest.mark.parametrize(
    "bad",
    [
        b'{"error": {"message": "x", "code": 400, "param": ' + b"[" * 1000 + b"]" * 1000 + b"}}",
        b'{"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "error", "error": '
        b'{"code": 400, "param": ' + b"[" * 1000 + b"]" * 1000 + b"}}]}",
    ],
)
async def test_a_streamed_error_nested_a_thousand_deep_fails_its_line(
    bad: bytes, make_settings, tmp_path
) -> None:
    # Its chunk went whole into the line of errors.jsonl, which could not be written
    # (RecursionError): the run ended exit 70.
    from aiohttp import web

    import pipeline
    from tests.conftest import bodies, read_jsonl
    from tests.scripted import answering

    async def answer(request: web.Request, body: dict) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: " + bad + b"\n\ndata: [DONE]\n\n")
        return response

    rows = [{**row, "stream": True} for row in bodies(2)]
    async with answering(answer) as url:
        summary = await pipeline.run(make_settings(url, rows, max_attempts=2))
    assert summary.exit_code == 1, summary.message
    assert [e["error"]["code"] for e in read_jsonl(tmp_path / "out/errors.jsonl")] == [
        "malformed_response"
    ] * 2
