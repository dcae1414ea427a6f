"""Streamed answers assembled into one chat completion, and streams that are not whole."""

from __future__ import annotations

import orjson
import pytest

from pipeline.errors import MalformedResponse, ProviderError
from pipeline.send.sse import StreamAssembler


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
