"""The mock, served: in this process for a test (`start_mock`, on 127.0.0.1, a free port), or
on its own for `pipeline mock` (`serve`, writing the port it got where asked)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from pipeline.mock.config import BACKLOG, MockConfig
from pipeline.mock.server import MockServer
from pipeline.run.preflight import raise_open_files


def _bound_port(site: web.TCPSite) -> int:
    server = site._server
    sockets = getattr(server, "sockets", None) or []
    return int(sockets[0].getsockname()[1])


def _write_port_file(path: str, port: int) -> None:
    tmp = Path(path + ".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)


@asynccontextmanager
async def start_mock(
    config: MockConfig | None = None, *, port: int = 0
) -> AsyncIterator[tuple[str, MockServer]]:
    """Serve the mock on 127.0.0.1 inside the running loop; yields its base URL and itself."""
    server = MockServer(config or MockConfig())
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True, backlog=BACKLOG)
    await site.start()
    bound = _bound_port(site)
    try:
        yield f"http://127.0.0.1:{bound}/v1", server
    finally:
        await runner.cleanup()


async def serve(
    config: MockConfig, *, host: str, port: int, port_file: str | None = None, quiet: bool = False
) -> None:
    raise_open_files()  # thousands of connections at once, as clients bring them
    server = MockServer(config)
    # A client that hangs up mid-answer (killed, timed out, cancelled) is normal here, not an
    # error worth a traceback.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
    runner = web.AppRunner(server.app(), access_log=None, handle_signals=True, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=BACKLOG)
    await site.start()
    bound = _bound_port(site)
    if port_file:
        _write_port_file(port_file, bound)
    if not quiet:
        print(f"mock endpoint listening on http://{host}:{bound}/v1 (Ctrl-C to stop)", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
