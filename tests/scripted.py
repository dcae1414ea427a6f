"""A server of a test's own on 127.0.0.1, for answers the mock does not give: every request
goes to the test's handler. It can go away (the port refuses connections, and connections
kept alive are reset) and come back on the same port: an outage."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web

from pipeline.mock.server import completion

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def answer(body: dict[str, Any], **top: Any) -> web.Response:
    """The mock's completion for `body`, with `top` keys replaced."""
    return json({**completion(body), **top})


def json(value: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(value), content_type="application/json")


class Scripted:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.down = False
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if self.down:  # a connection kept alive from before the outage: reset
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=500)
        return await self.handler(request)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
        await self._runner.setup()
        await self.come_back()

    async def go_away(self) -> None:
        """Connections refused from now on (and reset, those kept alive)."""
        self.down = True
        if self._site is not None:
            await self._site.stop()

    async def come_back(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await self._site.start()
        server = self._site._server
        self.port = int(server.sockets[0].getsockname()[1]) if server is not None else self.port  # type: ignore[union-attr]
        self.down = False

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[Scripted]:
    server = Scripted(handler)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


@asynccontextmanager
async def answering(
    answer: Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """`async with answering(answer) as base_url:` where `answer(request, body)` makes each
    answer from the request's parsed body (for what the built-in mock cannot say: a
    Retry-After of "inf", a stream with a line of megabytes)."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await answer(request, await request.json())

    async with scripted(handle) as server:
        yield server.url
