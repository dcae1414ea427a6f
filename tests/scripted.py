"""A server on 127.0.0.1 that answers as a test scripts it, for what the built-in mock cannot
say (a Retry-After of "inf", a stream with a line of megabytes)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web


@asynccontextmanager
async def scripted(
    answer: Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]],
) -> AsyncIterator[str]:
    """`async with scripted(answer) as base_url:` where `answer(request, body)` makes each
    answer to POST .../chat/completions."""

    async def handle(request: web.Request) -> web.StreamResponse:
        return await answer(request, await request.json())

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handle)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()
