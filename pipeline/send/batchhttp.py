"""The batch client's HTTP, shared by both shapes: one aiohttp session, the Bearer key, every
answer mapped where it arrives (as the synchronous client maps it: `client.error_for`,
`status.http_error`), the project's one retry policy (`retry.RetryPolicy`: 429 waits what
it is told, 5xx and dropped connections back off, 4xx do not retry), a create that is never
simply sent again. (Downloads, resumed where a cut left them: `batchdownload`; a batch
found again: `batchfind`.)

    404 on a collection path ({base}/files, {base}/batches)   NoBatchApi: no batch API here
      ... to a POST there, where a GET of it lists            HTTPStatusError (what was posted:
                                                               a model, a file not found)
    404 on one object ({base}/batches/ID)                      HTTPStatusError, not retried

The key is in the Authorization header only; whatever a server echoes is redacted from the
errors made of its answers.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import aiohttp
import orjson

from pipeline.errors import (
    CannotConnect,
    ConnectionDropped,
    HTTPStatusError,
    MalformedResponse,
    RequestError,
    RequestTimeout,
)
from pipeline.output.lines import Redactor
from pipeline.send.batchapi import BatchInfo, NoBatchApi
from pipeline.send.batchwire import WithoutMember, info_of
from pipeline.send.client import CONNECT_TIMEOUT, error_for
from pipeline.send.retry import RetryPolicy
from pipeline.urls import redacted

# A look or a create answers in seconds; an upload or a download takes what its size takes,
# and only a silence this long says it stalled.
QUICK = aiohttp.ClientTimeout(total=120.0, sock_connect=CONNECT_TIMEOUT)
LONG = aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT, sock_read=600.0)
# A delete is housekeeping that the next run does again if this one cannot: the run's end
# waits on it for a minute at most (three tries of 20 s, where a look's retries take up to 15).
BRIEF = aiohttp.ClientTimeout(total=20.0, sock_connect=CONNECT_TIMEOUT)
DELETES = RetryPolicy(max_attempts=3, max_time=60.0, base=1.0, cap=10.0, max_refused=60.0)
CHUNK = 1 << 16

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]
Body = Callable[[], Any]  # a request body made fresh for each attempt: a stream is read once


def may_have_made(error: RequestError) -> bool:
    """Whether a create that failed so may have made its batch all the same: the answer was
    lost (a connection dropped once the request was sent, no answer in time, a body that is
    not a batch) or the server failed after it may have acted (5xx). Never for a connection
    that was not made, a 429 (refused before it acted) or another 4xx."""
    if isinstance(error, CannotConnect):
        return False
    if isinstance(error, ConnectionDropped | RequestTimeout | MalformedResponse):
        return True
    return isinstance(error, HTTPStatusError) and (error.status or 0) >= 500


class BatchHttp:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        *,
        api_key: str | None,
        retry: RetryPolicy,
        sleep: Sleep | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._session = session
        self.clock = clock
        self.base_url = base_url
        self._redact = Redactor(api_key)
        self._retry = retry
        self._sleep = sleep
        # The batches this client made or found, by id, with their tags: one is never found
        # again for another tag (`batchfind`: where a provider keeps no tag, a folder's
        # batches look alike).
        self._tags: dict[str, str] = {}

    def no_api(self, *paths: str) -> NoBatchApi:
        where = " or ".join(f"GET {path}" for path in paths)
        return NoBatchApi(
            f"{redacted(self.base_url)} has no batch API (404 or no list at {where}); "
            "--tier sync works with this endpoint"
        )

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request's JSON answer, tried again as the retry policy says."""
        return await self._retry.call(lambda: self.once(method, path, **kwargs), sleep=self._sleep)

    async def once(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json: Any = None,
        body: Body | None = None,
        headers: Mapping[str, str] | None = None,
        slow: bool = False,
        brief: bool = False,
        collection: bool = False,
        without: bytes | None = None,
        dated: list[float] | None = None,
    ) -> Any:
        """One request, its JSON answer or its error. `slow`: an upload, that takes what its
        size takes; `collection`: the path is a collection's, so a 404 says the endpoint has
        no batch API; `without`: a top-level member of the answer read past, never held
        (`batchwire.WithoutMember`); `dated`: where the answer's Date goes, if it has one."""
        data = body() if body is not None else None
        refused: HTTPStatusError | None = None  # a 404 to a POST on a collection path
        try:
            async with self._session.request(
                method,
                self.base_url + path,
                params=params,
                json=json,
                data=data,
                headers=headers,
                timeout=LONG if slow else BRIEF if brief else QUICK,
            ) as resp:
                if resp.status >= 300:
                    raw = await resp.read()
                    if resp.status != 404 or not collection or method == "GET":
                        raise self.error(resp, raw, path, collection)
                    refused = error_for(
                        404, resp.headers, self._redact(raw), request_id=resp.headers.get("x-request-id")
                    )
                if dated is not None:
                    dated.extend(_date(resp.headers.get("Date")))
                if without is None:
                    raw = await resp.read()
                else:
                    kept = WithoutMember(without)
                    async for chunk in resp.content.iter_chunked(CHUNK):
                        kept.feed(chunk)
                    raw = kept.joined()
        except aiohttp.ClientError as e:
            raise dropped(e) from None
        except TimeoutError:
            raise RequestTimeout(f"no answer to {method} {path} within the timeout") from None
        if refused is not None:
            # A path that lists is there: its 404 is about what was posted (a model, a file
            # not found), and only a path that lists nothing says there is no batch API.
            if await self.lists(path, looks(path)) is None:
                raise self.no_api(path)
            raise refused
        try:
            return orjson.loads(raw) if raw.strip() else None
        except orjson.JSONDecodeError:
            text = self._redact(raw[:200]).decode("utf-8", "replace")
            raise MalformedResponse(
                f"the answer to {method} {path} is not JSON: {text!r}", body=text
            ) from None

    @property
    def session(self) -> aiohttp.ClientSession:
        return self._session

    def error(
        self, resp: aiohttp.ClientResponse, raw: bytes, path: str, collection: bool = False
    ) -> Exception:
        if resp.status == 404 and collection:
            return self.no_api(path)
        return error_for(
            resp.status, resp.headers, self._redact(raw), request_id=resp.headers.get("x-request-id")
        )

    async def lists(self, path: str, params: dict[str, str]) -> list[Any] | None:
        """What GET `path` lists, or None where the endpoint has no such list."""
        page = await self.listing(path, params)
        return None if page is None else page["data"]

    async def listing(self, path: str, params: dict[str, str]) -> dict[str, Any] | None:
        """The page GET `path` answers with its list in `data`, or None where the endpoint has
        no such list: a 404 or 405, or an answer that is no list (a web page served for any
        path). Only what says nothing of the path is tried again: a 401 or 403 is raised as
        it came."""

        async def look() -> dict[str, Any] | None:
            try:
                page = await self.once("GET", path, params=params)
            except HTTPStatusError as e:
                if e.status in (404, 405):
                    return None
                raise
            except MalformedResponse:
                return None
            listed = isinstance(page, dict) and isinstance(page.get("data"), list)
            return page if listed else None

        return await self.retry(look)

    async def check(self, *paths: str) -> None:
        """NoBatchApi unless each path lists (GETs: nothing that costs)."""
        for path in paths:
            if await self.lists(path, looks(path)) is None:
                raise self.no_api(path)

    async def retry(self, fn: Callable[[], Awaitable[T]], *, failed: RequestError | None = None) -> T:
        """`fn` as the retry policy tries it; `failed`: how a first try, made already, failed."""
        return await self._retry.call(fn, sleep=self._sleep, failed=failed)

    async def cancel(self, batch_id: str, get: Callable[[str], Awaitable[BatchInfo]]) -> BatchInfo:
        """Cancel a batch. Refused with a 400 or a 409 (OpenRouter's answer to a batch that
        has ended; OpenAI's is a 400), the batch is looked at: ended, it is described as it
        is; else the refusal stands. (A 409 is otherwise transient: asked again, it stays.)"""

        async def once() -> BatchInfo:
            try:
                return info_of(await self.once("POST", f"/batches/{batch_id}/cancel"))
            except HTTPStatusError as e:
                if e.status not in (400, 409):
                    raise
                info = await get(batch_id)
                if not info.ended:
                    raise
                return info

        return await self.retry(once)

    async def delete(self, path: str) -> None:
        """DELETE `path`, as the retry policy tries it, within a minute (`DELETES`); one not
        found (a 404) is gone already."""

        async def once() -> None:
            try:
                await self.once("DELETE", path, brief=True)
            except HTTPStatusError as e:
                if e.status != 404:
                    raise

        await DELETES.call(once, sleep=self._sleep)

    def others(self, tag: str) -> set[str]:
        """The batches this client made or found for another tag than `tag`."""
        return {batch_id for batch_id, made in self._tags.items() if made != tag}

    def noted(self, info: BatchInfo, tag: str) -> BatchInfo:
        self._tags[info.id] = tag
        return info

    async def create(
        self,
        tag: str,
        make: Callable[[], Awaitable[BatchInfo]],
        find: Callable[[], Awaitable[BatchInfo | None]],
    ) -> BatchInfo:
        """A batch made once, however its answers are lost: after a failure that may have made
        it (`may_have_made`), its tag is looked for before anything is sent again, and a batch
        found is the answer. Only when none carries the tag is it created again."""
        unsure = False

        async def attempt() -> BatchInfo:
            nonlocal unsure
            if unsure:
                found = await find()
                if found is not None:
                    return found
            try:
                return await make()
            except RequestError as e:
                unsure = unsure or may_have_made(e)
                raise

        return self.noted(await self._retry.call(attempt, sleep=self._sleep), tag)


def looks(path: str) -> dict[str, str]:
    """The query of a look at a collection (one item: it costs nothing)."""
    return {"purpose": "batch", "limit": "1"} if path == "/files" else {"limit": "1"}


def _date(value: str | None) -> list[float]:
    """An HTTP Date as epoch seconds: none, or one."""
    try:
        when = email.utils.parsedate_to_datetime(value or "")
    except (TypeError, ValueError, IndexError):
        return []
    return [when.replace(tzinfo=when.tzinfo or dt.UTC).timestamp()]


def dropped(error: aiohttp.ClientError) -> RequestError:
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return CannotConnect(f"cannot connect within {CONNECT_TIMEOUT:g}s")
    if isinstance(error, aiohttp.ServerTimeoutError):
        return RequestTimeout("nothing arrived within the timeout")
    if isinstance(error, aiohttp.ClientConnectorError):
        reason = error.os_error.strerror or type(error.os_error).__name__
        return CannotConnect(f"cannot connect to {error.host}:{error.port}: {reason}")
    if isinstance(error, aiohttp.ClientPayloadError):
        return ConnectionDropped("the connection closed in the middle of the answer")
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return ConnectionDropped("the server closed the connection before answering")
    return ConnectionDropped(f"connection failed: {type(error).__name__}")
