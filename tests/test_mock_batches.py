"""The built-in mock's batch APIs, as a client meets them over HTTP: OpenAI's files shape and
the inline one (OpenRouter's), each state on a fake clock (nothing waits), expiry and cancel
with part of the lines done, each way a batch fails validation, lines that fail, the counters
that prove nothing was paid twice, and a large file kept on disk rather than in memory."""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import tracemalloc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import aiohttp
import orjson
import pytest

from pipeline.mock.answers import completion
from pipeline.mock.command import add_mock_flags, mock_config

ENDPOINT = "/v1/chat/completions"
MODEL = "test/model"


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def body(i: int, content: str | None = None, model: str = MODEL) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content or f"question {i}"}]}


def line(i: int, content: str | None = None, *, model: str = MODEL, url: str = ENDPOINT) -> dict[str, Any]:
    return {"custom_id": f"job-{i}", "method": "POST", "url": url, "body": body(i, content, model)}


def jsonl(rows: list[Any]) -> bytes:
    return b"".join((r if isinstance(r, bytes) else orjson.dumps(r)) + b"\n" for r in rows)


class Api:
    """The calls a batch client makes, each giving the status and the parsed answer."""

    def __init__(self, url: str, session: aiohttp.ClientSession) -> None:
        self.url, self.session = url, session

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        async with self.session.request(method, f"{self.url}/{path}", **kw) as r:
            raw = await r.read()
            return r.status, orjson.loads(raw) if r.content_type == "application/json" else raw

    async def upload(self, data: Any, name: str = "pipeline-out-1.jsonl") -> dict[str, Any]:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", data, filename=name, content_type="application/jsonl")
        status, doc = await self.call("POST", "files", data=form)
        assert status == 200, doc
        return dict(doc)

    async def submit(self, rows: list[Any], tag: str = "pipeline-out-1") -> dict[str, Any]:
        """Upload `rows` and make a batch of them."""
        uploaded = await self.upload(jsonl(rows))
        status, doc = await self.call(
            "POST",
            "batches",
            json={
                "input_file_id": uploaded["id"],
                "endpoint": ENDPOINT,
                "completion_window": "24h",
                "metadata": {"pipeline_tag": tag},
            },
        )
        assert status == 200, doc
        return dict(doc)

    async def batch(self, batch_id: str) -> dict[str, Any]:
        status, doc = await self.call("GET", f"batches/{batch_id}")
        assert status == 200, doc
        return dict(doc)

    async def lines(self, file_id: str | None) -> list[dict[str, Any]]:
        if file_id is None:
            return []
        status, raw = await self.call("GET", f"files/{file_id}/content")
        assert status == 200
        return [orjson.loads(x) for x in raw.splitlines()]

    async def stats(self) -> dict[str, Any]:
        async with self.session.get(self.url.removesuffix("/v1") + "/mock/stats") as r:
            return dict(await r.json())


@pytest.fixture
def api(mock: Any) -> Callable[..., AbstractAsyncContextManager[tuple[Api, Clock, Any]]]:
    """`async with api(**mock_config) as (api, clock, server)`: the mock on a fake clock."""

    @asynccontextmanager
    async def started(**config: Any) -> AsyncIterator[tuple[Api, Clock, Any]]:
        clock = config.setdefault("clock", Clock())
        async with mock(record=False, **config) as (url, server), aiohttp.ClientSession() as session:
            yield Api(url, session), clock, server

    return started


def counts(doc: dict[str, Any]) -> tuple[int, int, int]:
    c = doc["request_counts"]
    return c["total"], c["completed"], c["failed"]


async def test_a_batch_validates_runs_its_lines_evenly_finalizes_and_answers_each_once(api: Any) -> None:
    async with api(batch_validating=10, batch_seconds=100, batch_finalizing=5) as (client, clock, _):
        made = await client.submit([line(i) for i in range(10)])
        assert made["status"] == "validating"
        assert made["metadata"] == {"pipeline_tag": "pipeline-out-1"}
        assert counts(made) == (0, 0, 0)
        seen = []
        for at in (9, 10, 60, 109, 110, 114, 115):
            clock.now = 1_000_000.0 + at
            doc = await client.batch(made["id"])
            seen.append((at, doc["status"], counts(doc)))
        assert seen == [
            (9, "validating", (0, 0, 0)),
            (10, "in_progress", (10, 0, 0)),
            (60, "in_progress", (10, 5, 0)),
            (109, "in_progress", (10, 9, 0)),
            (110, "finalizing", (10, 10, 0)),
            (114, "finalizing", (10, 10, 0)),
            (115, "completed", (10, 10, 0)),
        ]
        assert doc["completed_at"] == 1_000_115
        assert doc["finalizing_at"] == 1_000_110
        assert doc["error_file_id"] is None
        out = await client.lines(doc["output_file_id"])
        assert [x["custom_id"] for x in out] == [f"job-{i}" for i in range(10)]
        first = out[0]["response"]
        assert first["status_code"] == 200
        assert out[0]["error"] is None
        sync = completion(body(0))
        assert first["body"]["choices"] == sync["choices"]  # the synchronous mock's answer
        assert first["body"]["usage"]["cost"] == pytest.approx(sync["usage"]["cost"] / 2)  # at half price
        stats = (await client.stats())["batch"]
        assert stats["lines_answered"] == 10
        assert stats["lines_answered_twice"] == 0
        assert stats["batches_by_tag"] == {"pipeline-out-1": 1}
        assert stats["files_uploaded"] == 1


async def test_a_batch_that_expires_answers_the_lines_done_and_says_the_rest_expired(api: Any) -> None:
    async with api(batch_seconds=100, batch_expire_after=40) as (client, clock, _):
        made = await client.submit([line(i) for i in range(10)])
        clock.now += 39
        assert (await client.batch(made["id"]))["status"] == "in_progress"
        clock.now += 1
        doc = await client.batch(made["id"])
        assert doc["status"] == "expired"
        assert counts(doc) == (10, 4, 0)
        assert doc["expired_at"] == int(clock.now)
        out, err = await client.lines(doc["output_file_id"]), await client.lines(doc["error_file_id"])
        assert [x["custom_id"] for x in out] == [f"job-{i}" for i in range(4)]
        assert [x["custom_id"] for x in err] == [f"job-{i}" for i in range(4, 10)]
        assert {(x["response"], x["error"]["code"]) for x in err} == {(None, "batch_expired")}


async def test_a_cancelled_batch_is_cancelling_then_cancelled_and_keeps_the_lines_done(api: Any) -> None:
    async with api(batch_seconds=100, batch_cancelling=5) as (client, clock, _):
        made = await client.submit([line(i) for i in range(10)])
        clock.now += 30
        status, doc = await client.call("POST", f"batches/{made['id']}/cancel")
        assert status == 200
        assert doc["status"] == "cancelling"
        assert counts(doc) == (10, 3, 0)
        clock.now += 50  # no line runs once it is cancelling
        assert (await client.batch(made["id"]))["status"] == "cancelled"
        doc = await client.batch(made["id"])
        out, err = await client.lines(doc["output_file_id"]), await client.lines(doc["error_file_id"])
        assert [x["custom_id"] for x in out] == ["job-0", "job-1", "job-2"]
        assert len(err) == 7
        assert {x["error"]["code"] for x in err} == {"batch_cancelled"}
        status, _ = await client.call("POST", f"batches/{made['id']}/cancel")
        assert status == 200  # cancelling a cancelled batch changes nothing
        done = await client.submit([line(0)], tag="pipeline-out-2")
        clock.now += 100
        status, refused = await client.call("POST", f"batches/{done['id']}/cancel")
        assert status == 400
        assert "completed" in refused["error"]["message"]
        stats = (await client.stats())["batch"]
        assert stats["cancels"] == 1
        assert stats["lines_never_run"] == 7
        assert stats["lines_answered"] == 4


INVALID = {
    "not JSON": ([line(0), b'{"custom_id": "job-1", "meth'], "invalid_json_line", 2),
    "no custom_id": (
        [line(0), {k: v for k, v in line(1).items() if k != "custom_id"}],
        "missing_required_parameter",
        2,
    ),
    "duplicate custom_id": ([line(0), line(1), line(0)], "duplicate_custom_id", 3),
    "another url": ([line(0), line(1, url="/v1/embeddings")], "invalid_url", 2),
    "a second model": ([line(0), line(1, model="other/model")], "mismatched_model", 2),
    "too many lines": ([line(0), line(1), line(2)], "too_many_requests_in_batch", None),
    "too many bytes": ([line(i) for i in range(5)], "file_too_large", None),
}


@pytest.mark.parametrize("kind", INVALID)
async def test_a_batch_that_breaks_a_rule_fails_validation_saying_which_line(api: Any, kind: str) -> None:
    rows, code, number = INVALID[kind]
    async with api(batch_validating=3, batch_max_lines=2 if kind == "too many lines" else None,
                   batch_max_bytes=300 if kind == "too many bytes" else None) as (client, clock, _):  # fmt: skip
        made = await client.submit(rows)
        assert made["status"] == "validating"
        assert made["errors"] is None
        clock.now += 3
        doc = await client.batch(made["id"])
        assert doc["status"] == "failed"
        assert doc["failed_at"] == int(clock.now)
        assert [(e["code"], e["line"]) for e in doc["errors"]["data"]] == [(code, number)]
        assert doc["output_file_id"] is None
        assert doc["error_file_id"] is None
        stats = (await client.stats())["batch"]
        assert stats["failed_validation"] == 1
        assert stats["lines_answered"] == 0


async def test_a_batch_with_a_bad_line_cancelled_while_validating_ends_cancelled_with_nothing_run(
    api: Any,
) -> None:
    async with api(batch_validating=10) as (client, clock, _):
        made = await client.submit([line(0), b"not json"])
        status, doc = await client.call("POST", f"batches/{made['id']}/cancel")
        assert (status, doc["status"]) == (200, "cancelled")
        clock.now += 10
        doc = await client.batch(made["id"])
        assert (doc["status"], doc["output_file_id"], doc["error_file_id"]) == ("cancelled", None, None)
        assert (await client.stats())["batch"]["lines_answered"] == 0


async def test_lines_fail_at_the_fail_rate_or_by_their_marker_and_a_chatty_answer_is_still_an_answer(
    api: Any,
) -> None:
    rows = [line(i, "please fail_me" if i in (3, 7) else None) for i in range(40)]
    rows[5] = line(5, "say VERDICT please")
    async with api(batch_fail_rate=0.25, chatty_when="VERDICT", seed=7) as (client, _, _server):
        made = await client.submit(rows)
        doc = await client.batch(made["id"])
        out, err = await client.lines(doc["output_file_id"]), await client.lines(doc["error_file_id"])
    assert sorted(x["custom_id"] for x in out + err) == sorted(r["custom_id"] for r in rows)  # each line once
    codes = {x["custom_id"]: x["response"]["status_code"] for x in err}
    assert codes["job-3"] == codes["job-7"] == 400
    faults = [k for k, v in codes.items() if v == 500]
    assert 4 <= len(faults) <= 16  # about a quarter of the 38 others, at random
    assert {x["response"]["body"]["error"]["type"] for x in err if x["custom_id"] in faults} == {
        "server_error"
    }
    assert counts(doc) == (40, len(out), len(err))
    chatty = next(x for x in out if x["custom_id"] == "job-5")  # answered, and billed
    assert chatty["response"]["body"]["choices"][0]["message"]["content"].startswith("Sure!")


async def test_with_the_prompt_cache_on_a_batch_line_claims_no_cached_tokens(api: Any) -> None:
    """The mock's batches do not use its prompt cache (`--prefix-cache`): a line's usage says none
    of its prompt was cached, where one in four said half, at a price that did not discount it."""
    async with api(prefix_cache=8) as (client, _, _server):
        made = await client.submit([line(i) for i in range(12)])
        doc = await client.batch(made["id"])
        out = await client.lines(doc["output_file_id"])
    details = [x["response"]["body"]["usage"]["prompt_tokens_details"] for x in out]
    assert len(details) == 12
    assert {d["cached_tokens"] for d in details} == {0}
    assert any(completion(body(i))["usage"]["prompt_tokens_details"]["cached_tokens"] for i in range(12))


async def test_a_line_paid_twice_shows_in_the_counters(api: Any) -> None:
    async with api() as (client, _, _server):
        # The same tag and lines twice, at once: a submission paid twice.
        made = await asyncio.gather(*(client.submit([line(0), line(1)]) for _ in range(2)))
        assert made[0]["id"] != made[1]["id"]
        for one in made:
            await client.batch(one["id"])
        status, _ = await client.call("POST", "chat/completions", json=body(0))
        assert status == 200
        stats = await client.stats()
    assert stats["batch"]["tags_twice"] == 1
    assert stats["batch"]["batches_created"] == 2
    assert stats["batch"]["lines_answered_twice"] == 2
    assert stats["batch"]["lines_answered"] == 4
    # A line answered in batches and synchronously too is a job answered twice.
    assert stats["answered_twice"] == 2
    assert stats["answered"] == 5


async def test_a_submission_can_be_refused_as_the_synchronous_path_is(api: Any) -> None:
    async with api(batch_script=[429, 500], retry_after=7, credits=2) as (client, _, _server):
        refusals = []
        for _ in range(2):
            async with client.session.post(f"{client.url}/files", data={"purpose": "batch"}) as r:
                refusals.append((r.status, r.headers.get("Retry-After")))
        assert refusals == [(429, "7"), (500, None)]
        await client.batch((await client.submit([line(0), line(1)]))["id"])  # spends the credits
        uploaded = await client.upload(jsonl([line(2)]))
        status, doc = await client.call(
            "POST",
            "batches",
            json={"input_file_id": uploaded["id"], "endpoint": ENDPOINT, "completion_window": "24h"},
        )
        assert (status, doc["error"]["type"]) == (402, "payment_required")
        assert (await client.stats())["batch"]["submissions_refused"] == {"429": 1, "500": 1, "402": 1}


async def test_the_files_api_lists_gets_and_deletes_and_a_batch_keeps_its_own_lines(api: Any) -> None:
    async with api(batch_seconds=10) as (client, clock, _):
        made = await client.submit([line(0)])
        status, listed = await client.call("GET", "files", params={"purpose": "batch"})
        assert status == 200
        assert [f["id"] for f in listed["data"]] == [made["input_file_id"]]
        status, got = await client.call("GET", f"files/{made['input_file_id']}")
        assert status == 200
        assert got["filename"] == "pipeline-out-1.jsonl"
        assert got["purpose"] == "batch"
        status, gone = await client.call("DELETE", f"files/{made['input_file_id']}")
        assert status == 200
        assert gone["deleted"] is True
        assert (await client.call("GET", f"files/{made['input_file_id']}"))[0] == 404
        clock.now += 10
        doc = await client.batch(made["id"])
        assert [x["custom_id"] for x in await client.lines(doc["output_file_id"])] == ["job-0"]
        second = await client.submit([line(1)], tag="pipeline-out-2")
        status, page = await client.call("GET", "batches", params={"limit": "1"})
        assert [b["id"] for b in page["data"]] == [second["id"]]
        assert page["has_more"] is True
        status, page = await client.call("GET", "batches", params={"limit": "5", "after": second["id"]})
        assert [b["id"] for b in page["data"]] == [made["id"]]
        assert page["has_more"] is False
        assert (await client.call("GET", "batches/batch_nothing"))[0] == 404


async def inline_post(client: Api, payload: bytes) -> tuple[int, Any]:
    return await client.call("POST", "batches", data=payload, headers={"Content-Type": "application/json"})


def inline_body(requests: list[Any], *, first: str = "endpoint", model: str = MODEL) -> bytes:
    head = {
        "endpoint": ENDPOINT,
        "model": model,
        "completion_window": "24h",
        "metadata": {"pipeline_tag": "t"},
    }
    order = ["requests", *head] if first == "requests" else [*head, "requests"]
    doc = {**head, "requests": requests}
    return orjson.dumps({k: doc[k] for k in order})


async def test_the_inline_shape_plays_openrouters_batches(api: Any) -> None:
    requests = [{"custom_id": f"job-{i}", "body": {"messages": body(i)["messages"]}} for i in range(5)]
    requests[2]["body"]["messages"][0]["content"] = "fail_me"
    async with api(batch_api="inline", batch_seconds=100, batch_expire_after=60) as (client, clock, _):
        status, refused = await inline_post(client, inline_body(requests, first="requests"))
        assert status == 400
        assert "before 'requests'" in refused["error"]["message"]
        status, made = await inline_post(client, inline_body(requests))
        assert status == 202
        assert made["status"] == "validating"
        assert made["model"] == MODEL
        assert "metadata" not in made
        assert counts(made) == (5, 0, 0)
        assert made["results"] == []
        assert made["usage"] is None
        assert (await client.call("GET", f"batches/{made['id']}/results"))[0] == 409  # not ended yet
        clock.now += 60
        doc = await client.batch(made["id"])
        assert doc["status"] == "expired"
        assert counts(doc) == (5, 2, 1)
        assert doc["finalized_at"] == int(clock.now)
        results = doc["results"]
        assert [r["custom_id"] for r in results] == [f"job-{i}" for i in range(5)]
        assert [r["response"]["status_code"] if r["response"] else r["error"]["type"] for r in results] == [
            200, 200, 400, "batch_expired", "batch_expired",
        ]  # fmt: skip
        assert results[0]["response"]["body"]["model"] == MODEL  # a request inherits the batch's model
        assert doc["usage"]["prompt_tokens"] > 0
        assert doc["usage"]["cost"] > 0
        paged, cursor = [], None
        while True:
            status, page = await client.call(
                "GET",
                f"batches/{made['id']}/results",
                params={"limit": "2", **({"cursor": cursor} if cursor else {})},
            )
            assert status == 200
            paged += page["data"]
            cursor = page["next_cursor"]
            if not page["has_more"]:
                break
        assert paged == results
        assert cursor is None
        for bad in (b"x", b"-5", b"5", b"99"):  # not a number, negative, past the end
            cursor = base64.urlsafe_b64encode(bad).decode()
            assert (await client.call("GET", f"batches/{made['id']}/results", params={"cursor": cursor}))[
                0
            ] == 400
        status, listed = await client.call("GET", "batches")
        assert [b["id"] for b in listed["data"]] == [made["id"]]
        assert "results" not in listed["data"][0]
        assert (await client.call("POST", "files"))[0] == 404  # no files API in this shape
        assert (await client.call("DELETE", f"batches/{made['id']}"))[0] == 200
        assert (await client.call("GET", f"batches/{made['id']}"))[0] == 404


IMAGE = [
    {"type": "text", "text": "what is it?"},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
]


@pytest.mark.parametrize(
    ("second", "said"),
    [
        (body(1, model="other/model"), "one model"),
        ({"messages": [{"role": "user", "content": IMAGE}]}, "text-only"),
    ],
)
async def test_an_inline_batch_of_two_models_or_with_an_image_fails_validation_with_a_message(
    api: Any, second: dict[str, Any], said: str
) -> None:
    requests = [{"custom_id": "a", "body": body(0)}, {"custom_id": "b", "body": second}]
    async with api(batch_api="inline") as (client, _, _server):
        status, made = await inline_post(client, inline_body(requests))
        assert status == 202
        doc = await client.batch(made["id"])
    assert doc["status"] == "failed"
    assert "requests[1]" in doc["error"]["message"]
    assert said in doc["error"]["message"]
    assert doc["results"] == []


async def test_a_files_batch_takes_images(api: Any) -> None:
    async with api() as (client, _, _server):
        made = await client.submit(
            [line(0), {**line(1), "body": {"model": MODEL, "messages": [{"role": "user", "content": IMAGE}]}}]
        )
        doc = await client.batch(made["id"])
    assert (doc["status"], counts(doc)) == ("completed", (2, 2, 0))


@pytest.mark.parametrize("shape", ["none", "inline", "files"])
async def test_an_endpoint_without_a_batch_api_answers_404_on_every_batch_path(api: Any, shape: str) -> None:
    async with api(batch_api=shape, api_key="sk-mock") as (client, _, _server):
        auth = {"Authorization": "Bearer sk-mock"}
        got = [
            (await client.call(m, p, headers=auth))[0]
            for m, p in [
                ("GET", "files"),
                ("POST", "files"),
                ("GET", "batches"),
                ("POST", "batches"),
                ("GET", "batches/b"),
            ]
        ]
        wrong_key = (await client.call("GET", "batches"))[0]
    expected = {
        "none": ([404] * 5, 404),
        "inline": ([404, 404, 200, 400, 404], 401),
        "files": ([200, 400, 200, 400, 404], 401),
    }
    assert (got, wrong_key) == expected[shape]


async def test_a_large_file_goes_through_disk_not_memory(api: Any) -> None:
    chunk = jsonl([line(i, "x" * 900) for i in range(200)])  # ~190 KB
    rounds = 20 * 1024 * 1024 // len(chunk) + 1

    async def parts() -> AsyncIterator[bytes]:
        for _ in range(rounds):
            yield chunk

    sent = hashlib.sha256(chunk * rounds).hexdigest()
    async with api() as (client, _, server):
        tracemalloc.start()
        try:
            uploaded = await client.upload(parts())
            got = hashlib.sha256()
            async with client.session.get(f"{client.url}/files/{uploaded['id']}/content") as r:
                async for piece in r.content.iter_chunked(1 << 16):
                    got.update(piece)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        folder = server.files.folder
        assert uploaded["bytes"] == len(chunk) * rounds > 20 * 1024 * 1024
        assert got.hexdigest() == sent
        assert peak < 8 * 1024 * 1024  # neither side held the 20 MB
    assert not folder.exists()  # the server's files go when it stops


def test_every_batch_option_is_a_flag_of_pipeline_mock() -> None:
    parser = argparse.ArgumentParser()
    add_mock_flags(parser)
    args = parser.parse_args(
        [
            "--batch-api",
            "inline",
            "--batch-seconds",
            "30",
            "--batch-validating",
            "2",
            "--batch-finalizing",
            "3",
            "--batch-cancelling",
            "4",
            "--batch-expire-after",
            "20",
            "--batch-fail-rate",
            "0.1",
            "--batch-max-lines",
            "10",
            "--batch-max-bytes",
            "5000",
            "--batch-metadata",
        ]
    )
    config = mock_config(args)
    assert (config.batch_api, config.batch_seconds, config.batch_validating) == ("inline", 30, 2)
    assert (config.batch_finalizing, config.batch_cancelling, config.batch_expire_after) == (3, 4, 20)
    assert (config.batch_fail_rate, config.batch_max_lines, config.batch_max_bytes) == (0.1, 10, 5000)
    assert config.batch_metadata is True
    assert mock_config(parser.parse_args([])).batch_api == "files"
    with pytest.raises(SystemExit):
        parser.parse_args(["--batch-api", "smoke"])
