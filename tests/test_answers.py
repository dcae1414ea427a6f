"""No empty answer kept, no billed answer uncounted: a 200 without an answer in it is asked
for again, and whatever usage an answer reports, kept or thrown away, is counted as spent."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

import pipeline
from pipeline.errors import EmptyAnswer
from pipeline.mock.server import completion, stream_chunks
from pipeline.send.client import check_completion
from tests.conftest import bodies, read_jsonl
from tests.scripted import json, scripted

USAGE = {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6, "cost": 0.001}
NEVER = "question 29"  # answered empty every time


class Gateway:
    """A gateway while a model starts cold: first answers of every kind that hold nothing,
    then the answer; it counts every token it bills."""

    def __init__(self) -> None:
        self.tries = Counter[str]()
        self.billed = 0
        self.cost = 0.0

    def bill(self, body: dict[str, Any]) -> dict[str, Any]:
        self.billed += body["usage"]["total_tokens"]
        self.cost += body["usage"]["cost"]
        return body

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        text = body["messages"][0]["content"]
        i = int(text.split()[-1])
        self.tries[text] += 1
        full = completion(body)
        if self.tries[text] == 1 or text == NEVER:
            cold = self.cold(i, full)
            if cold is not None:
                return cold if isinstance(cold, web.StreamResponse) else await self.stream(request, cold)
        if i % 10 == 3:  # content "" that says it stopped: an answer
            full["choices"][0]["message"]["content"] = ""
        if i % 10 == 4:  # a reasoning model that spent every token thinking: cut, but an answer
            full["choices"][0].update(finish_reason="length")
            full["choices"][0]["message"].update(content=None, reasoning="thinking...")
        if body.get("stream"):
            return await self.stream(request, stream_chunks(self.bill(full), True))
        return json(self.bill(full))

    def cold(self, i: int, full: dict[str, Any]) -> web.Response | list[dict[str, Any]] | None:
        kind = 0 if i == 29 else i % 10
        empty = {"index": 0, "message": {"role": "assistant", "content": None}, "finish_reason": None}
        if kind == 0:  # content null, no finish_reason
            return json(self.bill({**full, "choices": [empty], "usage": USAGE}))
        if kind == 1:  # no choices at all
            return json(self.bill({**full, "choices": [], "usage": USAGE}))
        if kind == 2:  # n = 2: one choice an answer, the other empty
            return json(
                self.bill({**full, "choices": [full["choices"][0], {**empty, "index": 1}], "usage": USAGE})
            )
        if kind == 5:  # an error inside a 200, billed
            return json(self.bill({"error": {"message": "upstream hiccup", "code": 502}, "usage": USAGE}))
        if kind == 6:  # streamed: only the usage, then [DONE]
            chunk = {
                "id": "c",
                "object": "chat.completion.chunk",
                "choices": [],
                "usage": self.bill({"usage": USAGE})["usage"],
            }
            return [chunk]
        return None

    async def stream(self, request: web.Request, chunks: list[dict[str, Any]]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


async def test_empty_answers_are_asked_again_and_every_billed_token_is_counted(
    make_settings, tmp_path: Path
) -> None:
    rows = bodies(40)
    for i, row in enumerate(rows):
        if i % 10 == 6:
            row.update(stream=True, stream_options={"include_usage": True})
    gateway = Gateway()
    async with scripted(gateway) as server:
        summary = await pipeline.run(make_settings(server.url, rows, max_attempts=3))
    assert summary.exit_code == 1
    results = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(tmp_path / "out/results.jsonl")}
    errors = read_jsonl(tmp_path / "out/errors.jsonl")
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [("job-29", "empty_answer")]
    assert errors[0]["attempts"] == 3
    assert len(results) == 39
    for body in results.values():  # every result holds an answer, or says why it has none
        for choice in body["choices"]:
            message = choice["message"]
            assert message.get("content") or choice["finish_reason"], body
    assert results["job-3"]["choices"][0] == {**results["job-3"]["choices"][0], "finish_reason": "stop"}
    assert results["job-3"]["choices"][0]["message"]["content"] == ""
    assert results["job-4"]["choices"][0]["finish_reason"] == "length"
    usage = orjson.loads((tmp_path / "out/usage.json").read_bytes())
    assert usage["tokens"]["total_tokens"] == gateway.billed  # kept or thrown away, all counted
    assert usage["cost"]["total"] == pytest.approx(gateway.cost)
    assert usage["answers_by_status"]["empty_answer"] == 4 * 4 + 3  # 4 of each cold kind, job-29's 3
    assert usage["answers_by_status"]["provider_error"] == 4


@pytest.mark.parametrize(
    ("choice", "kept"),
    [
        ({"message": {"role": "assistant", "content": None}, "finish_reason": None}, False),
        ({"message": {"role": "assistant", "content": ""}}, False),
        ({"message": {"role": "assistant"}}, False),
        ({}, False),
        ({"message": {"content": ""}, "finish_reason": "stop"}, True),
        ({"message": {"content": None}, "finish_reason": "length"}, True),
        ({"message": {"content": "hi"}}, True),  # some servers leave finish_reason out
        ({"message": {"content": None, "tool_calls": [{"id": "t"}]}}, True),
        ({"message": {"content": None, "refusal": "I can't"}}, True),
        ({"text": "hi"}, True),  # a completion's shape, as some servers answer
    ],
)
def test_what_a_choice_must_hold_to_be_an_answer(choice: dict[str, Any], kept: bool) -> None:
    body = {"choices": [{"index": 0, **choice}]}
    if kept:
        assert check_completion(body) is body
    else:
        with pytest.raises(EmptyAnswer):
            check_completion(body)


@pytest.mark.parametrize("choices", [True, 7])
async def test_a_broken_answer_that_reports_usage_is_counted_not_a_crash(
    choices: Any, make_settings, tmp_path: Path
) -> None:
    # Counting what it reported took len() of its choices: True or 7 raised TypeError in the
    # worker, and the run ended exit 70 ('internal error').
    async def handler(request: web.Request) -> web.StreamResponse:
        return json({"id": "x", "choices": choices, "usage": USAGE})

    async with scripted(handler) as server:
        summary = await pipeline.run(make_settings(server.url, bodies(2), max_attempts=2))
    assert summary.exit_code == 1, summary.message
    errors = read_jsonl(tmp_path / "out/errors.jsonl")
    assert [e["error"]["code"] for e in errors] == ["malformed_response"] * 2
    usage = orjson.loads((tmp_path / "out/usage.json").read_bytes())
    assert usage["tokens"]["total_tokens"] == 4 * USAGE["total_tokens"]  # billed, all four
