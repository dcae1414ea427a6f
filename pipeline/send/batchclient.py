"""The batch client, opened: one session for an endpoint's batch API, in the shape asked for
(`batch_api = "files" | "inline"`) or the one the endpoint offers, found by looking (GETs of
lists, which cost nothing):

    GET {base}/batches lists a batch                files if it names an input file
                                                    (OpenAI's shape), else inline
    else GET {base}/files?purpose=batch lists       files, unless the list is OpenRouter's
                                                    (its "_shape" says which of its shapes:
                                                    it keeps files, and batches only inline)
    else GET {base}/batches lists (none yet)        inline
    neither lists (a 404, 405, or no list at all)   NoBatchApi: "--tier sync works"

Any other refusal (401, 403, a 429 or 5xx past the retry policy) is raised as it came, for
the run to handle as the synchronous path does.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp

from pipeline import __version__
from pipeline.errors import SettingsError
from pipeline.send.batchapi import BatchApi
from pipeline.send.batchfiles import FilesBatchApi
from pipeline.send.batchhttp import BatchHttp, Sleep, looks
from pipeline.send.batchinline import InlineBatchApi
from pipeline.send.retry import RetryPolicy

SHAPES = ("files", "inline")
MAX_LINE_BYTES = 32 * 1024 * 1024  # as the input's (settings.max_line_bytes)


def batch_retry() -> RetryPolicy:
    """The retry policy's bounds for batch API calls: few calls, each worth waiting for (a
    429 waits what it is told, up to the policy's ten minutes of refusals)."""
    return RetryPolicy(max_attempts=8, max_time=900.0, base=1.0, cap=60.0)


@asynccontextmanager
async def open_batch_api(
    base_url: str,
    api_key: str | None,
    shape: str | None = None,
    *,
    max_lines: int | None = None,
    max_bytes: int | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
    retry: RetryPolicy | None = None,
    sleep: Sleep | None = None,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[BatchApi]:
    """The endpoint's batch API. `shape` None: the one it offers (NoBatchApi when none);
    `max_lines` / `max_bytes`: a batch's limits where not the provider's (tests make them
    small); `sleep`: how the retry policy waits (tests: not at all)."""
    if shape is not None and shape not in SHAPES:
        raise SettingsError(f"batch_api {shape!r} is not one of {', '.join(SHAPES)}")
    headers = {"User-Agent": f"pipeline/{__version__}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    connector = aiohttp.TCPConnector(limit=8, ttl_dns_cache=300)
    session = aiohttp.ClientSession(connector=connector, headers=headers, read_bufsize=1 << 20)
    try:
        http = BatchHttp(
            session, base_url, api_key=api_key, retry=retry or batch_retry(), sleep=sleep, clock=clock
        )
        api: BatchApi
        if (shape or await discover(http)) == "files":
            api = FilesBatchApi(http, max_line=max_line_bytes, clock=clock)
        else:
            api = InlineBatchApi(http, clock=clock)
        api.max_lines = within(api, "batch_max_lines", max_lines, api.max_lines)
        api.max_bytes = within(api, "batch_max_bytes", max_bytes, api.max_bytes)
        yield api
    finally:
        await session.close()


def within(api: BatchApi, key: str, given: int | None, most: int) -> int:
    """A batch's limit as set (`batch_max_lines`, `batch_max_bytes`), else the shape's own.
    More than the shape's own is refused before anything is uploaded: a batch over the
    provider's limit fails whole, and a setting quietly lowered is one nobody meant."""
    if given is None:
        return most
    if given > most:
        raise SettingsError(
            f"{key} is {given:,}, above the {api.shape} batch API's own limit of {most:,} a batch: "
            f"set it to {most:,} or less, or leave it out"
        )
    return given


async def discover(http: BatchHttp) -> str:
    """Which shape the endpoint offers (see the module's text)."""
    batches = await http.lists("/batches", looks("/batches"))
    if batches:
        named = any(isinstance(obj, dict) and "input_file_id" in obj for obj in batches)
        return "files" if named else "inline"
    files = await http.listing("/files", looks("/files"))
    if files is not None and "_shape" not in files:  # (OpenRouter's lists say theirs, whichever)
        return "files"
    if batches is None:
        raise http.no_api("/files", "/batches")
    return "inline"
