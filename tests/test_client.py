"""What the client makes of an answer: Retry-After, and 200s that are not results."""

from __future__ import annotations

import email.utils
import time
from collections import Counter

import orjson
import pytest
from aiohttp import web

import pipeline
from pipeline.errors import MalformedResponse, ProviderError
from pipeline.mock.server import completion
from pipeline.send.client import check_completion, retry_after, said_wait
from tests.conftest import bodies, read_jsonl
from tests.scripted import json, scripted


def test_retry_after_in_seconds_milliseconds_and_http_dates() -> None:
    assert retry_after({"retry-after": "3"}) == 3.0
    assert retry_after({"retry-after": "0.5"}) == 0.5
    assert retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (retry_after({"retry-after": when}) or 0) <= 31
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({}) is None


def test_a_refusal_that_says_when_in_its_message_only() -> None:
    # OpenAI's wording; some servers send nothing else.
    said = "Rate limit reached for gpt-4o-mini on requests per min (RPM): Limit 3, Used 3. Please try again in 71ms."
    assert said_wait(said) == pytest.approx(0.071)
    assert said_wait("Please try again in 1.5s. Visit https://...") == pytest.approx(1.5)
    assert said_wait("please try again in 6m0s") == pytest.approx(360)
    assert said_wait("Rate limit reached") is None


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        ({"error": {"message": "boom", "code": 502}}, ProviderError, "boom"),
        ({"object": "list", "data": []}, MalformedResponse, "no choices"),
        ([1, 2], MalformedResponse, "not a JSON object"),
        (
            {"choices": [{"index": 0, "finish_reason": "error", "message": {}}]},
            ProviderError,
            "finished with an error",
        ),
    ],
)
def test_a_200_that_is_not_a_completion_is_a_failure(body: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        check_completion(body)


async def test_a_body_of_megabytes_arrives_whole(mock, make_settings) -> None:
    import pipeline

    text = "".join(chr(ord("a") + i % 26) for i in range(3_000_000))  # 3 MB: sent in slices
    rows = [{"custom_id": "big", "model": "m", "messages": [{"role": "user", "content": text}]}]
    async with mock() as (url, server):
        summary = await pipeline.run(make_settings(url, rows))
        assert summary.succeeded == 1
        assert server.state.received[0]["messages"][0]["content"] == text


async def test_answers_nested_deep_are_asked_again_and_never_kept_unreadable(make_settings) -> None:
    """A 200 whose error is nested a thousand deep ended the run (RecursionError, exit 70); one
    whose answer is was copied into a results line nested past what a reader reads back, so
    the next run's repair cut it and bought it again, on every run."""
    deep = b"[" * 1_000 + b'"x"' + b"]" * 1_000  # (orjson writes at most 254 levels)
    tries: Counter[str] = Counter()

    def raw(text: bytes) -> web.Response:
        return web.Response(body=text, content_type="application/json")

    async def gateway(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        said = body["messages"][0]["content"]
        tries[said] += 1
        if tries[said] == 1:
            return raw(b'{"error": {"code": 500, "message": ' + deep + b"}}")
        if tries[said] == 2:
            return raw(orjson.dumps(completion(body))[:-1] + b', "system_fingerprint": ' + deep + b"}")
        return json(completion(body))

    async with scripted(gateway) as server:
        settings = make_settings(server.url, bodies(3), max_attempts=3)
        first = await pipeline.run(settings)
        again = await pipeline.run(settings)
    assert (first.exit_code, first.succeeded) == (0, 3)
    assert (again.exit_code, again.skipped, again.succeeded) == (0, 3, 0)  # nothing bought again
    assert set(tries.values()) == {3}
    kept = read_jsonl(settings.folder / "results.jsonl")
    assert len(kept) == 3
    assert not any(isinstance(r["response"]["body"].get("system_fingerprint"), list) for r in kept)


async def test_answers_written_over_several_lines_are_kept_one_line_each(make_settings) -> None:
    """A body's bytes are copied into its results line as they came only where they hold no
    line break: a pretty-printed answer, or one broken by a lone carriage return, is
    written again on one line."""

    async def gateway(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        said = body["messages"][0]["content"]
        text = orjson.dumps(completion(body), option=orjson.OPT_INDENT_2)  # broken by \n
        if said.endswith("1"):
            text = text.replace(b"\n", b"\r")  # by a lone \r
        return web.Response(body=text, content_type="application/json")

    async with scripted(gateway) as server:
        settings = make_settings(server.url, bodies(2))
        summary = await pipeline.run(settings)
    assert summary.succeeded == 2
    lines = (settings.folder / "results.jsonl").read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert len(lines) == 3
    assert all(b"\r" not in line for line in lines)
    assert (
        sorted(orjson.loads(line)["response"]["body"]["object"] for line in lines[:2])
        == ["chat.completion"] * 2
    )


DEEP = b"[" * 1000 + b"]" * 1000


@pytest.mark.parametrize(
    ("status", "raw", "exit_code"),
    [
        (400, b'{"error": {"message": "bad", "param": ' + DEEP + b"}}", 1),  # errors.jsonl unwritable
        (429, b'{"error": {"code": ' + DEEP + b"}}", 3),  # is it insufficient_quota?
        (404, b'{"error": {"type": ' + DEEP + b"}}", 3),  # does it say the model is gone?
        (403, b'{"error": {"message": ' + DEEP + b"}}", 1),  # does it refuse the content?
    ],
)
async def test_an_error_body_nested_a_thousand_deep_is_kept_as_text(
    status: int, raw: bytes, exit_code: int, make_settings, tmp_path
) -> None:
    # Read whole, what the run asks of it raised RecursionError (str() of its parts, or the
    # line of errors.jsonl), and the run ended exit 70.
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(status=status, body=raw, content_type="application/json")

    async with scripted(handler) as server:
        summary = await pipeline.run(make_settings(server.url, bodies(2), give_up_after=0.5))
    assert summary.exit_code == exit_code, summary.message
    for error in read_jsonl(tmp_path / "out/errors.jsonl"):
        assert isinstance(error["response"]["body"], str)
