"""Paid once and each line once, whatever the provider keeps and however its answers are lost:
a batch looked for after a lost create is found (its tag not kept, our clock ahead of the
provider's) and never taken for its sibling (where no tag is kept, a folder's batches look
alike: one model, cut at the most lines a batch takes); results read from pages whose cursor
comes back, or from a body cut where no length was said, give no line twice or torn."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from pipeline.errors import MalformedResponse
from pipeline.mock.server import MockServer
from pipeline.send.batchapi import BatchInfo
from pipeline.send.batchclient import open_batch_api
from tests.batchfake import Fault, fake_batches
from tests.scripted import json, scripted

MODEL = "test/model"
Mock = Callable[..., AbstractAsyncContextManager[tuple[str, MockServer]]]


async def no_wait(seconds: float) -> None:
    pass


def staged(tmp_path: Path, n: int, first: int = 0) -> Path:
    path = tmp_path / f"{first}.jsonl"
    rows = (
        {
            "custom_id": f"job-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": f"question {i}"}]},
        }
        for i in range(first, first + n)
    )
    path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return path


async def stats(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url.removesuffix("/v1") + "/mock/stats") as r:
        return dict(await r.json())


async def test_a_lost_create_is_not_taken_for_the_batch_made_before_it(mock: Mock, tmp_path: Path) -> None:
    # The second create is answered with a 500 (it may have made the batch: it did not).
    async with (
        mock(batch_api="inline", batch_script=["ok", 500]) as (url, _),
        open_batch_api(url, None, sleep=no_wait) as api,
    ):
        first = await api.submit(staged(tmp_path, 3), tag="pipeline-t-0", model=MODEL, lines=3)
        second = await api.submit(staged(tmp_path, 3, 3), tag="pipeline-t-1", model=MODEL, lines=3)
        ended = await api.get(second.id)
        ids = [_parsed(line)["custom_id"] async for line in api.results(ended)]
        made = (await stats(url))["batch"]["batches_created"]
    assert second.id != first.id
    assert made == 2
    assert sorted(ids) == ["job-3", "job-4", "job-5"]


async def test_a_resumed_run_looks_past_the_batches_it_holds(mock: Mock, tmp_path: Path) -> None:
    async with mock(batch_api="inline") as (url, _):
        async with open_batch_api(url, None, sleep=no_wait) as killed:
            first = await killed.submit(staged(tmp_path, 3), tag="pipeline-t-0", model=MODEL, lines=3)
        # Killed once batch 1 was committed creating, before it was sent: none was made.
        async with open_batch_api(url, None, sleep=no_wait) as resumed:
            assert await resumed.find("pipeline-t-1", since=0, model=MODEL, lines=3, taken=[first.id]) is None
            again = await resumed.find("pipeline-t-0", since=0, model=MODEL, lines=3)
    assert again is not None
    assert again.id == first.id


async def test_a_lost_create_is_found_by_its_file_where_the_tag_is_not_kept(tmp_path: Path) -> None:
    # A files-shape provider that lists "metadata": null: the tag is lost, the file is not.
    async with (
        fake_batches("files", metadata=False) as fake,
        open_batch_api(fake.url, None, sleep=no_wait) as api,
    ):
        fake.fault("create", Fault(drop="after"))  # made, and the answer lost
        info = await api.submit(staged(tmp_path, 3), tag="pipeline-t-0", model=MODEL, lines=3)
    assert len(fake.batches) == 1
    assert info.id == "batch_0"


async def test_a_lost_create_is_found_when_our_clock_runs_ahead_of_the_providers(tmp_path: Path) -> None:
    ahead = lambda: time.time() + 600  # noqa: E731 (a machine ten minutes fast)
    async with (
        fake_batches("files") as fake,
        open_batch_api(fake.url, None, sleep=no_wait, clock=ahead) as api,
    ):
        fake.fault("create", Fault(drop="after"))
        info = await api.submit(staged(tmp_path, 3), tag="pipeline-t-0", model=MODEL, lines=3)
    assert len(fake.batches) == 1
    assert info.id == "batch_0"


async def test_an_inline_lost_create_is_found_when_our_clock_runs_ahead(tmp_path: Path) -> None:
    ahead = lambda: time.time() + 600  # noqa: E731
    async with (
        fake_batches("inline", metadata=False) as fake,
        open_batch_api(fake.url, None, sleep=no_wait, clock=ahead) as api,
    ):
        fake.fault("create", Fault(drop="after"))
        info = await api.submit(staged(tmp_path, 3), tag="pipeline-t-0", model=MODEL, lines=3)
    assert len(fake.batches) == 1
    assert info.id == "batch_0"


async def test_a_results_cursor_that_comes_back_gives_no_line_twice() -> None:
    # A gateway whose second page hands back the first page's cursor (and, the third time,
    # says it is done): each line must come once, or the reading must stop.
    pages: list[str | None] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        cursor = request.query.get("cursor")
        pages.append(cursor)
        rows = [{"id": f"r{cursor}", "custom_id": f"job-{cursor}", "response": None, "error": None}]
        more = len(pages) < 3
        return json({"object": "list", "data": rows, "has_more": more, "next_cursor": "c1" if more else None})

    async with scripted(handle) as server, open_batch_api(server.url, None, "inline", sleep=no_wait) as api:
        got: list[str] = []

        async def read() -> None:
            async for line in api.results(BatchInfo(id="batch_1", status="completed")):
                got.append(_parsed(line)["custom_id"])

        with pytest.raises(MalformedResponse):
            await read()
    assert got == ["job-None", "job-c1"]


async def test_a_download_without_a_length_cut_mid_line_gives_the_line_whole() -> None:
    # A body that ends where the connection closes (no Content-Length, not chunked), cut in
    # the last line: the end of the body is no end of the file.
    rows = [orjson.dumps({"custom_id": f"job-{i}", "response": {"status_code": 200}}) for i in range(3)]
    content = b"\n".join(rows) + b"\n"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        ranged = re.search(rb"(?i)\r\nrange: bytes=(\d+)-", head)
        if ranged:
            writer.write(b"HTTP/1.1 206 Partial Content\r\nConnection: close\r\n\r\n")
            writer.write(content[int(ranged.group(1)) :])
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + content[:-20])
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    async with server, open_batch_api(url, None, "files", sleep=no_wait) as api:
        got = [line async for line in api.results(BatchInfo(id="b", status="completed", output_file="f"))]
    assert got == rows


async def test_a_batch_failed_for_the_enqueued_token_limit_says_its_code(tmp_path: Path) -> None:
    # OpenAI's answer to a batch past the organisation's enqueued tokens: failed, no line named;
    # the same batch passes once those running end, so the run must be able to tell.
    said = "Enqueued token limit reached for gpt-4o-mini in organization org-x. Limit: 2,000,000 enqueued tokens."
    async with fake_batches("files") as fake, open_batch_api(fake.url, None, sleep=no_wait) as api:
        info = await api.submit(staged(tmp_path, 3), tag="pipeline-t-0", model=MODEL, lines=3)
        fake.finish(info.id, "failed")
        fake.batches[info.id]["errors"] = {
            "object": "list",
            "data": [{"code": "token_limit_exceeded", "message": said, "param": None, "line": None}],
        }
        ended = await api.get(info.id)
    assert ended.errors == (f"token_limit_exceeded: {said}",)


async def test_answers_counted_with_no_file_named_are_not_read_as_none(tmp_path: Path) -> None:
    async with fake_batches("files") as fake, open_batch_api(fake.url, None, sleep=no_wait) as api:
        info = await api.submit(staged(tmp_path, 2), tag="pipeline-t-0", model=MODEL, lines=2)
        fake.finish(info.id)  # completed, and no output file named (yet)
        fake.batches[info.id]["request_counts"] |= {"completed": 2}
        ended = await api.get(info.id)

        async def read() -> list[bytes]:
            return [line async for line in api.results(ended)]

        with pytest.raises(MalformedResponse):
            await read()


def _parsed(line: bytes | dict[str, Any]) -> Any:
    """A result line as its object (the inline shape gives it parsed, as it read it)."""
    return line if isinstance(line, dict) else orjson.loads(line)
