"""The only module that speaks HTTP: one aiohttp session, one POST per attempt.

Every answer becomes a `Reply` or one error of `pipeline.errors`; nothing else escapes but
cancellation. The API key goes into the Authorization header and nowhere else.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import orjson

from pipeline import __version__
from pipeline.errors import (
    CannotConnect,
    ConnectionDropped,
    HTTPStatusError,
    MalformedResponse,
    RequestTimeout,
)
from pipeline.input.jsonl import too_deep
from pipeline.job import Reply, Request
from pipeline.quote import brief
from pipeline.send.sse import assemble
from pipeline.send.status import empty_answer, http_error, provider_error
from pipeline.send.waits import retry_after, said_wait

RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)
CONNECT_TIMEOUT = 30.0  # seconds
MODELS_TIMEOUT = 5.0  # seconds for GET /models, asked once when a 404 says nothing
_ERROR_TEXT_LIMIT = 2000
_BIG_BODY = 1 << 20
_SLICE = 256 * 1024


def rate_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    if "x-ratelimit-remaining-requests" not in headers and "x-ratelimit-remaining-tokens" not in headers:
        return None
    return {k: headers[k] for k in RATE_HEADERS if k in headers}


def error_for(
    status: int,
    headers: Mapping[str, str],
    raw: bytes,
    *,
    request_id: str | None = None,
    limits: dict[str, str] | None = None,
) -> HTTPStatusError:
    """A non-2xx answer as its error, with the wait it asks for: its headers say, else (a 429)
    its message may ("Please try again in 71ms")."""
    body, message = _error_body(raw)
    wait = retry_after(headers)
    if wait is None and status == 429:
        wait = said_wait(message)
    return http_error(status, message, retry_after=wait, body=body, request_id=request_id, limits=limits)


def _error_body(raw: bytes) -> tuple[Any, str]:
    """The server's error body (parsed when it is JSON) and a one-line message from it. A
    body nested too deep is kept as text: read whole, str() of its parts raised RecursionError
    (a 429's code, a 404's type, a 403's message), and its line of errors.jsonl could not be
    written, each ending the run."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    if body is None or too_deep(raw, body):
        text = raw[:_ERROR_TEXT_LIMIT].decode("utf-8", "replace")
        return text, brief(text)
    message = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):
            message = error.get("message")
        elif isinstance(error, str):
            message = error
        message = message or body.get("message") or body.get("detail")
    return body, brief(message or raw[:300].decode("utf-8", "replace"))


def check_completion(body: Any, *, request_id: str | None = None) -> dict[str, Any]:
    """A 200 body is a result only if it is a chat completion without an error in it."""
    if not isinstance(body, dict):
        raise MalformedResponse("the answer is not a JSON object", body=body, request_id=request_id)
    error = body.get("error")
    if error:
        message = brief(error.get("message") if isinstance(error, dict) else error)
        code = error.get("code") if isinstance(error, dict) else None
        raise provider_error(
            f"provider error inside a 200 answer: {message}", code=code, body=body, request_id=request_id
        )
    choices = body.get("choices")
    if not isinstance(choices, list):
        raise MalformedResponse(
            "the answer is not a chat completion: no choices", body=body, request_id=request_id
        )
    ended = bool(choices)  # every choice says why it ended: none is empty (`empty_answer`)
    for choice in choices:
        if not isinstance(choice, dict):
            raise MalformedResponse(
                "the answer has a choice that is not an object", body=body, request_id=request_id
            )
        reason = choice.get("finish_reason")
        if reason == "error":
            raise provider_error(
                "a choice finished with an error", code=None, body=body, request_id=request_id
            )
        ended = ended and bool(reason)
    if not ended:
        empty = empty_answer(body, request_id=request_id)
        if empty is not None:
            raise empty
    return body


class _BigBody(aiohttp.payload.Payload):
    """A big body (images) sent in slices of its own bytes: aiohttp's way for big bodies,
    io.BytesIO, copies the body whole, and with 64 photos in flight that was 200 MB more."""

    def __init__(self, value: bytes) -> None:
        super().__init__(value, content_type="application/json")
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return bytes(self._value)

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(
        self, writer: aiohttp.abc.AbstractStreamWriter, content_length: int | None
    ) -> None:
        view = memoryview(self._value)
        end = len(view) if content_length is None else min(len(view), content_length)
        for start in range(0, end, _SLICE):
            # The writer waits for the socket to drain past 64 KiB: one slice at a time in
            # the transport's buffer, and the loop free between slices.
            await writer.write(view[start : min(start + _SLICE, end)])


class Client:
    def __init__(
        self, session: aiohttp.ClientSession, base_url: str, *, timeout: float, idle_timeout: float
    ) -> None:
        self._session = session
        self.url = f"{base_url}/chat/completions"
        self._models_url = f"{base_url}/models"
        self._idle = idle_timeout
        # An answer that is not streamed arrives whole at the end: only a total can bound it.
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT)
        # A stream has no total timeout: a long answer that keeps arriving is never cut. One
        # that sends nothing (not even an SSE comment) for `idle_timeout` has stalled.
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT, sock_read=idle_timeout
        )

    async def complete(self, request: Request) -> Reply:
        started = time.perf_counter()
        try:
            # aiohttp wants big bodies as a stream, so that sending them cannot block the loop.
            data = request.payload if len(request.payload) < _BIG_BODY else _BigBody(request.payload)
            timeout = self._stream_timeout if request.stream else self._timeout
            async with self._session.post(self.url, data=data, timeout=timeout) as resp:
                request_id = resp.headers.get("x-request-id")
                limits = rate_headers(resp.headers)
                if resp.status >= 300:
                    raw = await resp.read()
                    raise error_for(resp.status, resp.headers, raw, request_id=request_id, limits=limits)
                if request.stream and resp.content_type != "application/json":
                    reply = await self._read_stream(resp, started, request_id)
                    reply.limits = limits
                    return reply
                # (a server that ignores stream: true answers with one JSON body: read as such)
                raw = await resp.read()
        except aiohttp.ConnectionTimeoutError:
            raise CannotConnect(f"cannot connect within {CONNECT_TIMEOUT:g}s") from None
        except TimeoutError:
            if request.stream:
                raise ConnectionDropped(
                    f"the stream stalled: nothing arrived for {self._idle:g}s (--idle-timeout)"
                ) from None
            raise RequestTimeout("no complete answer within the timeout (--timeout)") from None
        except aiohttp.ClientConnectorError as e:
            raise CannotConnect(f"cannot connect to {e.host}:{e.port}: {e.os_error.strerror or e}") from None
        except aiohttp.ClientPayloadError:
            raise ConnectionDropped("the connection closed in the middle of the answer") from None
        except aiohttp.ServerDisconnectedError:
            raise ConnectionDropped("the server closed the connection before answering") from None
        except aiohttp.ClientError as e:
            raise ConnectionDropped(f"connection failed: {type(e).__name__}") from None
        latency = time.perf_counter() - started
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            text = raw[:200].decode("utf-8", "replace")
            raise MalformedResponse(
                f"the answer is not JSON: {text!r}", body=text, request_id=request_id
            ) from None
        if too_deep(raw, body):
            # Copied into its results line it would nest past what a reader reads back: the
            # next run's repair would cut it, and buy it again. (A stream: each chunk, in `sse`.)
            raise MalformedResponse("the answer is nested too deep to be kept", request_id=request_id)
        check_completion(body, request_id=request_id)
        # The body's own bytes go to results.jsonl untouched when they fit on one line. (find,
        # not `in`: bytes' `in` first tries its operand as a byte's number, and a failed try
        # costs an exception made and cleared, 1,000 instructions a look.)
        one_line = raw.find(b"\n") < 0 and raw.find(b"\r") < 0
        # (its fields in order, positional: half the time of keywords, for every answer)
        return Reply(
            body,
            raw.strip() if one_line else None,
            200,
            request_id or body.get("id"),
            latency,
            None,
            limits,
        )

    async def models(self) -> list[str] | None:
        """The ids of GET {base_url}/models (`pipeline.send.notfound` asks, once a run, when a
        404 says nothing): a server that answers it with a list knows its path is right. None
        when it gives no list: another status, not JSON, no answer within MODELS_TIMEOUT."""
        timeout = aiohttp.ClientTimeout(total=MODELS_TIMEOUT)
        try:
            async with self._session.get(self._models_url, timeout=timeout) as resp:
                if resp.status != 200:
                    return None
                raw = await resp.read()
        except (aiohttp.ClientError, TimeoutError):
            return None
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        # OpenAI's shape is {"object": "list", "data": [{"id": ...}]}; some list bare.
        data = body.get("data", body.get("models")) if isinstance(body, dict) else body
        if not isinstance(data, list):
            return None
        # Only names that are text: str() of whatever else a server lists can raise (a value
        # nested a thousand deep, RecursionError; a number of 5,000 digits, ValueError).
        named = ((m.get("id") or m.get("name")) if isinstance(m, dict) else m for m in data)
        return [name for name in named if isinstance(name, str)]

    async def _read_stream(
        self, resp: aiohttp.ClientResponse, started: float, request_id: str | None
    ) -> Reply:
        ttft = None

        def first_token() -> None:
            nonlocal ttft
            ttft = time.perf_counter() - started

        body = await assemble(resp.content.iter_any(), first_token=first_token)
        return Reply(
            body=body,
            raw=None,
            request_id=request_id or body.get("id"),
            latency=time.perf_counter() - started,
            ttft=ttft,
        )


@asynccontextmanager
async def open_client(
    base_url: str, *, api_key: str | None, concurrency: int, request_timeout: float, idle_timeout: float
) -> AsyncIterator[Client]:
    headers = {"Content-Type": "application/json", "User-Agent": f"pipeline/{__version__}"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, ttl_dns_cache=300)
    session = aiohttp.ClientSession(
        connector=connector,
        headers=headers,
        read_bufsize=1 << 20,
    )
    try:
        yield Client(session, base_url, timeout=request_timeout, idle_timeout=idle_timeout)
    finally:
        await session.close()
