"""The mock's batch APIs over HTTP, under any prefix (`/v1/...`, `/api/v1/...`), with the
synchronous path's Bearer key:

- `files` (OpenAI's): `POST/GET files`, `GET/DELETE files/{id}`, `GET files/{id}/content`;
  `POST/GET batches`, `GET batches/{id}`, `POST batches/{id}/cancel`.
- `inline` (OpenRouter's): `POST batches` with a `requests` array (202); `GET batches`,
  `GET batches/{id}` (results in it once ended), `GET batches/{id}/results?cursor=`,
  `POST batches/{id}/cancel`, `DELETE batches/{id}` (an ended one). No files paths: 404.
- `none`: no path at all, each one 404, as at an endpoint without a batch API.
"""

from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from pipeline.mock import batchhang
from pipeline.mock.batches import ENDED, ENDPOINT, Batches, MockBatch
from pipeline.mock.batchviews import files_object, inline_object, with_results
from pipeline.mock.config import MockConfig
from pipeline.mock.files import FileStore, error, json

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
PREFIX = "/{prefix:(?:.*/)?}"  # any prefix that ends a path segment ("profiles" is not "files")
MOST_LISTED = 100


def add_batch_routes(app: web.Application, config: MockConfig, files: FileStore, batches: Batches) -> None:
    if config.batch_api == "none":
        return
    api = BatchRoutes(config, files, batches)
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "batches", api.listed),
        ("GET", "batches/{batch_id}", api.get),
        ("POST", "batches/{batch_id}/cancel", api.cancel),
    ]
    if config.batch_api == "inline":
        routes += [
            ("POST", "batches", api.create_inline),
            ("GET", "batches/{batch_id}/results", api.results),
            ("DELETE", "batches/{batch_id}", api.delete),
        ]
    else:
        routes += [
            ("POST", "batches", api.create_files),
            ("POST", "files", files.upload),
            ("GET", "files", files.listed),
            ("GET", "files/{file_id}", files.get),
            ("GET", "files/{file_id}/content", files.content),
            ("DELETE", "files/{file_id}", files.delete),
        ]
    for method, path, handler in routes:
        handler = held(config, files, batches, method, path, handler)
        if method == "POST" and path in ("files", "batches"):  # what submits
            handler = api.refusing(handler, paid=path == "batches")
        app.router.add_route(method, PREFIX + path, api.keyed(handler))


def held(
    config: MockConfig, files: FileStore, batches: Batches, method: str, path: str, handler: Handler
) -> Handler:
    """`handler`, held at the step `batch_hang` names (`pipeline.mock.batchhang`)."""
    points = {
        ("POST", "files"): "upload",
        ("POST", "batches"): "create",
    }
    if (method, path) in points:
        return batchhang.after(config, batches.tally, points[method, path], handler)
    if (method, path) == ("GET", "batches/{batch_id}"):
        return batchhang.look_held(config, batches, handler)
    if path == "files/{file_id}/content":
        return batchhang.half_content(config, files, handler)
    if path == "batches/{batch_id}/results":
        return batchhang.half_results(config, batches, handler)
    return handler


async def _object(request: web.Request) -> dict[str, Any] | web.Response:
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return error(400, "The body is not JSON")
    return body if isinstance(body, dict) else error(400, "The body is not a JSON object")


class BatchRoutes:
    def __init__(self, config: MockConfig, files: FileStore, batches: Batches) -> None:
        self.config, self.files, self.batches = config, files, batches
        self.inline = config.batch_api == "inline"
        self.sources = itertools.count(1)

    def keyed(self, handler: Handler) -> Handler:
        """`handler`, behind the key the synchronous path asks for."""

        async def checked(request: web.Request) -> web.StreamResponse:
            key = self.config.api_key
            if key is not None and request.headers.get("Authorization") != f"Bearer {key}":
                return error(401, "Incorrect API key provided", "authentication_error")
            return await handler(request)

        return checked

    def refusing(self, handler: Handler, *, paid: bool) -> Handler:
        """`handler`, after the refusals `batch_script` plays and, where `paid` (making a
        batch; an upload costs nothing), those of credits run out."""

        async def submitted(request: web.Request) -> web.StreamResponse:
            cfg, tally = self.config, self.batches.tally
            action = cfg.batch_script.pop(0) if cfg.batch_script else None
            if action is not None and action not in (200, "ok"):
                tally.refused[str(action)] += 1
                return _refusal(int(action), cfg.retry_after)
            if paid and cfg.credits is not None and sum(self.batches.state.answered.values()) >= cfg.credits:
                tally.refused["402"] += 1
                return error(402, "Insufficient credits", "payment_required")
            return await handler(request)

        return submitted

    def _batch(self, request: web.Request) -> MockBatch | None:
        return self.batches.batches.get(request.match_info["batch_id"])

    def _missing(self, request: web.Request) -> web.Response:
        return error(404, f"No batch found with id {request.match_info['batch_id']!r}", "not_found_error")

    async def _shown(self, request: web.Request, batch: MockBatch) -> web.StreamResponse:
        status, done = await self.batches.look(batch)
        if not self.inline:
            return json(files_object(batch, status, done))
        results = batch.ending.results if batch.ending else None
        path = results.path if results is not None else None
        return await with_results(request, inline_object(batch, status, done), path)

    async def create_files(self, request: web.Request) -> web.Response:
        body = await _object(request)
        if isinstance(body, web.Response):
            return body
        file_id = body.get("input_file_id")
        found = self.files.files.get(file_id) if isinstance(file_id, str) else None
        if found is None or found.purpose != "batch":
            return error(
                400,
                f"'input_file_id' must name a file of purpose 'batch' (not {file_id!r})",
                param="input_file_id",
            )
        wrong = _wrong_window(body) or _wrong_metadata(body)
        if body.get("endpoint") != ENDPOINT:
            wrong = wrong or (f"'endpoint' must be {ENDPOINT!r} here", "endpoint")
        if wrong:
            return error(400, wrong[0], param=wrong[1])
        # The batch keeps its own copy of the lines: deleting the file later takes nothing from it.
        source = self._source_path()
        try:
            os.link(found.path, source)
        except OSError:
            shutil.copyfile(found.path, source)
        batch = await self.batches.make(
            "files", source, model=None, metadata=body.get("metadata"), input_file_id=file_id
        )
        return json(files_object(batch, "validating", 0))  # as made, whatever a look now says

    async def create_inline(self, request: web.Request) -> web.StreamResponse:
        body = await _object(request)
        if isinstance(body, web.Response):
            return body
        keys = list(body)  # in the order sent
        model, requests = body.get("model"), body.get("requests")
        if "requests" in keys and {"endpoint", "model"} & set(keys[keys.index("requests") :]):
            # OpenRouter stream-parses the body: it must know both before the requests come.
            wrong: tuple[str, str] | None = ("'endpoint' and 'model' must come before 'requests'", "requests")
        elif body.get("endpoint") != ENDPOINT:
            wrong = (f"'endpoint' must be {ENDPOINT!r} here", "endpoint")
        elif not isinstance(model, str) or not model:
            wrong = ("Missing required parameter: 'model'", "model")
        elif not isinstance(requests, list) or not requests:
            wrong = ("'requests' must be a non-empty array", "requests")
        else:
            wrong = _wrong_window(body, optional=True) or _wrong_metadata(body)
        if wrong or not isinstance(requests, list) or not isinstance(model, str):
            return error(400, wrong[0] if wrong else "Invalid batch", param=wrong[1] if wrong else None)
        source = self._source_path()
        with source.open("wb") as out:
            for one in requests:
                out.write(orjson.dumps(_as_line(one, model)) + b"\n")
        batch = await self.batches.make("inline", source, model=model, metadata=body.get("metadata"))
        return json(inline_object(batch, "validating", 0), status=202)  # as OpenRouter: queued, not checked

    def _source_path(self) -> Path:
        return self.files.folder / f"batch-input-{next(self.sources)}.jsonl"

    async def get(self, request: web.Request) -> web.StreamResponse:
        batch = self._batch(request)
        return self._missing(request) if batch is None else await self._shown(request, batch)

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        batch = self._batch(request)
        if batch is None:
            return self._missing(request)
        refused = self.batches.cancel(batch)
        if refused is not None:
            return error(400, refused)
        return await self._shown(request, batch)

    async def listed(self, request: web.Request) -> web.Response:
        try:
            limit = min(max(int(request.query.get("limit", "20")), 1), MOST_LISTED)
        except ValueError:
            return error(400, "'limit' must be a whole number", param="limit")
        newest = list(self.batches.batches.values())[::-1]
        after = request.query.get("after")
        if after is not None:
            ids = [b.id for b in newest]
            newest = newest[ids.index(after) + 1 :] if after in ids else []
        wanted = set(request.query.getall("status", []))
        data: list[dict[str, Any]] = []
        for batch in newest:
            status, done = await self.batches.look(batch)
            shown = (
                inline_object(batch, status, done, listed=True)
                if self.inline
                else files_object(batch, status, done)
            )
            if not wanted or shown["status"] in wanted:
                data.append(shown)
            if len(data) > limit:
                break
        more, data = len(data) > limit, data[:limit]
        first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
        return json({"object": "list", "data": data, "first_id": first, "last_id": last, "has_more": more})

    async def results(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        if batch is None:
            return self._missing(request)
        status, _ = await self.batches.look(batch)
        if status not in ENDED:
            return error(409, f"The batch is {status}: its results come once it has ended")
        results = batch.ending.results if batch.ending else None
        if results is None:  # (failed at validation: nothing ran)
            return json({"object": "list", "data": [], "has_more": False, "next_cursor": None})
        found = results.page(cursor=request.query.get("cursor"), limit=request.query.get("limit"))
        if found is None:
            return error(400, "Invalid 'cursor' or 'limit'", param="cursor")
        return web.Response(body=found, content_type="application/json")

    async def delete(self, request: web.Request) -> web.Response:
        batch = self._batch(request)
        if batch is None:
            return self._missing(request)
        status, _ = await self.batches.look(batch)
        if status not in ENDED:
            return error(409, f"The batch is {status}: only an ended batch can be deleted")
        del self.batches.batches[batch.id]
        self.batches.tally.deleted += 1
        if batch.ending is not None and batch.ending.results is not None:
            batch.ending.results.path.unlink(missing_ok=True)
        batch.source.unlink(missing_ok=True)
        return json({"id": batch.id, "object": "batch.deleted", "deletion": {"openrouter": "deleted"}})


def _refusal(status: int, retry_after: float) -> web.Response:
    kinds = {401: "authentication_error", 402: "payment_required", 429: "rate_limit_error"}
    refused = error(status, f"mock batch refusal {status}", kinds.get(status, "server_error"))
    if status in (429, 503):
        refused.headers["Retry-After"] = f"{retry_after:g}"
    return refused


def _as_line(one: Any, model: str) -> Any:
    """An inline request as an OpenAI batch input line; its body names the batch's model
    where it names none (OpenRouter: a request inherits it)."""
    if not isinstance(one, dict):
        return one
    body = one.get("body")
    if isinstance(body, dict) and "model" not in body:
        body = {"model": model, **body}
    return {"custom_id": one.get("custom_id"), "method": "POST", "url": ENDPOINT, "body": body}


def _wrong_window(body: dict[str, Any], *, optional: bool = False) -> tuple[str, str] | None:
    window = body.get("completion_window")
    if (window is None and optional) or window == "24h":
        return None
    return "'completion_window' must be '24h'", "completion_window"


def _wrong_metadata(body: dict[str, Any]) -> tuple[str, str] | None:
    metadata = body.get("metadata")
    if metadata is None or (
        isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())
    ):
        return None
    return "'metadata' must be an object of strings", "metadata"
