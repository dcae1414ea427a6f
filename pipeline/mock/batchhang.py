"""Calls of the batch APIs held after the mock has acted on them (`MockConfig.batch_hang`), so
that a test can kill its client (SIGKILL, a real one) at a chosen step of a submission or a
taking in, knowing what the provider has done by then:

    upload    the file stored, its id never sent back
    create    the batch made (and so paid for), its id never sent back
    look      a batch looked at (one that ended, answered), the answer never sent
    content   half of a result file's bytes sent (files shape), the connection cut, and the
              ask for the rest held
    results   the pages of results through half of them given (inline shape), then a page
              never answered
(At the last two, the client has taken in every line it was given before it asks again.)

Each point is taken once, in the order the list gives them, when the call it names comes.
The mock counts what it holds (`GET /mock/stats`: batch `hung`) and sets `BatchTally.hanging`
so that a test in the same process awaits it rather than polling. A held call stays held
until the client goes or the server stops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

from pipeline.mock.batches import Batches
from pipeline.mock.batchpages import line_of
from pipeline.mock.config import MockConfig
from pipeline.mock.files import FileStore
from pipeline.mock.state import BatchTally

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
POINTS = ("upload", "create", "look", "content", "results")


def due(config: MockConfig, point: str) -> bool:
    """Whether the call at `point` is the next one to hold (then it is taken off the list)."""
    if config.batch_hang and config.batch_hang[0] == point:
        config.batch_hang.pop(0)
        return True
    return False


async def hold(tally: BatchTally, point: str) -> None:
    """Never return: the call is held (counted, and said to a waiting test)."""
    tally.hung[point] += 1
    tally.hanging.set()
    await asyncio.Event().wait()


def after(config: MockConfig, tally: BatchTally, point: str, handler: Handler) -> Handler:
    """`handler`, acted on in full, then its answer held where `point` is due."""

    async def held(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        if due(config, point):
            await hold(tally, point)
        return response

    return held


def look_held(config: MockConfig, batches: Batches, handler: Handler) -> Handler:
    """A batch's description; where `look` is due, looked at (an ended one answered) and
    never sent."""

    async def look(request: web.Request) -> web.StreamResponse:
        if due(config, "look"):
            batch = batches.batches.get(request.match_info["batch_id"])
            if batch is not None:
                await batches.look(batch)
            await hold(batches.tally, "look")
        return await handler(request)

    return look


def half_content(config: MockConfig, files: FileStore, handler: Handler) -> Handler:
    """A file's content; where `content` is due, its first half sent and the connection cut,
    then the client's next ask for the file (the rest, from its last whole line) held: by
    then it has taken in every line of the half (tests need no look at its files)."""
    cut: set[str] = set()

    async def content(request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        if file_id in cut:
            cut.discard(file_id)
            await hold(files.tally, "content")
        found = files.files.get(file_id)
        if found is None or found.purpose != "batch_output" or not due(config, "content"):
            return await handler(request)
        data = found.path.read_bytes()
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = len(data)
        await response.prepare(request)
        await response.write(data[: len(data) // 2])
        cut.add(file_id)
        if request.transport is not None:
            request.transport.abort()
        return response

    return content


def half_results(config: MockConfig, batches: Batches, handler: Handler) -> Handler:
    """A page of results; where `results` is due, the first page that starts past half of
    the batch's results is never answered."""

    async def results(request: web.Request) -> web.StreamResponse:
        cursor = request.query.get("cursor")
        if cursor and config.batch_hang and config.batch_hang[0] == "results":
            line = line_of(cursor) or 0
            batch = batches.batches.get(request.match_info["batch_id"])
            ending = batch.ending if batch is not None else None
            pages = ending.results if ending is not None else None
            if pages is not None and line >= pages.lines // 2 and due(config, "results"):
                await hold(batches.tally, "results")
        return await handler(request)

    return results
