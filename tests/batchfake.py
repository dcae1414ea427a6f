"""A batch API of a test's own on 127.0.0.1, in either shape, for the faults the mock does not
play: a scripted answer (a status, its headers, a body) or a dropped connection before or
after the work is done, at any path; downloads cut after so many bytes, with or without
Range; batches listed a page at a time. Its batches end when a test says (`finish`)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

from tests.scripted import json


@dataclass
class Fault:
    status: int = 0  # an answer of this status instead of the work
    headers: dict[str, str] = field(default_factory=dict)
    body: Any = None
    drop: str = ""  # "before": the connection closed, nothing done; "after": done, then closed
    page: bool = False  # a web page (200, HTML), as some servers answer any path


def _error(
    status: int, message: str, headers: dict[str, str] | None = None, body: Any = None
) -> web.Response:
    value = body if body is not None else {"error": {"message": message, "type": "invalid_request_error"}}
    return web.Response(
        status=status, body=orjson.dumps(value), content_type="application/json", headers=headers
    )


async def _drop(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(
        status=200, headers={"Content-Type": "application/json", "Content-Length": "999"}
    )
    await response.prepare(request)
    await response.write(b'{"id": "bat')
    if request.transport is not None:
        request.transport.abort()
    return response


class FakeBatches:
    def __init__(self, shape: str, *, metadata: bool = True, results_path: bool = True) -> None:
        self.shape = shape  # "files", "inline" or "none"
        self.metadata = metadata  # whether batches keep metadata (files: null when not; inline: no field)
        self.results_path = results_path  # inline: whether GET /batches/{id}/results exists
        self.faults: dict[str, list[Fault]] = {}  # route name -> faults, taken in turn
        self.files: dict[str, dict[str, Any]] = {}
        self.content: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}  # in order made
        self.results: dict[str, list[dict[str, Any]]] = {}  # inline: each batch's answers
        self.posted: list[bytes] = []  # inline: the bodies posted, as sent
        self.cut: list[int] = []  # downloads: bytes sent before the connection drops, in turn
        self.ranges = True  # downloads honour Range
        self.asked: list[str] = []  # the Range headers downloads came with
        self.seen: list[str] = []  # "METHOD path?query" of every request
        self.url = ""

    # -- what a test does --------------------------------------------------------------
    def fault(self, route: str, *faults: Fault) -> None:
        self.faults.setdefault(route, []).extend(faults)

    def add_file(self, content: bytes) -> str:
        file_id = f"file-{len(self.files)}"
        self.files[file_id] = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "purpose": "batch",
        }
        self.content[file_id] = content
        return file_id

    def finish(
        self, batch_id: str, status: str = "completed", *, output: bytes = b"", errors: bytes = b""
    ) -> None:
        batch = self.batches[batch_id]
        batch["status"] = status
        if self.shape == "files":
            batch["output_file_id"] = self.add_file(output) if output else None
            batch["error_file_id"] = self.add_file(errors) if errors else None

    # -- the server ----------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        r = app.router
        r.add_post("/v1/files", self._route("upload", self.upload))
        r.add_get("/v1/files", self._route("files", self.list_files))
        r.add_get("/v1/files/{id}/content", self._route("content", self.download))
        r.add_post("/v1/batches", self._route("create", self.create))
        r.add_get("/v1/batches", self._route("list", self.list_batches))
        r.add_get("/v1/batches/{id}", self._route("get", self.get))
        r.add_get("/v1/batches/{id}/results", self._route("results", self.page))
        r.add_post("/v1/batches/{id}/cancel", self._route("cancel", self.cancel))
        r.add_delete("/v1/files/{id}", self._route("delete", self.delete))
        r.add_delete("/v1/batches/{id}", self._route("delete", self.delete))
        return app

    def _route(self, name: str, handler: Any) -> Any:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.seen.append(f"{request.method} {request.path_qs}")
            fault = self.faults[name].pop(0) if self.faults.get(name) else None
            files_only = name in ("upload", "files", "content")
            if fault is None and (self.shape == "none" or (files_only and self.shape != "files")):
                return _error(404, "Not Found")
            if fault is None and name == "results" and not self.results_path:
                return _error(404, "Not Found")
            if fault is not None and fault.drop == "before":
                await request.read()
                return await _drop(request)
            if fault is not None and fault.page:
                return web.Response(body=b"<html>Welcome</html>", content_type="text/html")
            if fault is not None and fault.status:
                return _error(fault.status, "scripted", fault.headers, fault.body)
            answer: web.StreamResponse = await handler(request)
            if fault is not None and fault.drop == "after":
                return await _drop(request)
            return answer

        return handle

    async def upload(self, request: web.Request) -> web.Response:
        reader = await request.multipart()
        purpose, name, content = None, None, b""
        async for part in reader:
            if part.name == "purpose":
                purpose = (await part.read()).decode()  # type: ignore[union-attr]
            elif part.name == "file":
                name = part.filename  # type: ignore[union-attr]
                content = bytes(await part.read())  # type: ignore[union-attr]
        if purpose != "batch":
            return _error(400, "purpose must be batch")
        file_id = self.add_file(content)
        self.files[file_id]["filename"] = name
        return json(self.files[file_id])

    async def list_files(self, request: web.Request) -> web.Response:
        return json({"object": "list", "data": list(self.files.values())})

    async def download(self, request: web.Request) -> web.StreamResponse:
        content = self.content.get(request.match_info["id"])
        if content is None:
            return _error(404, "No such file")
        start, status = 0, 200
        spec = request.headers.get("Range", "")
        self.asked.append(spec)
        if self.ranges and spec.startswith("bytes="):
            start, status = int(spec[6:].rstrip("-")), 206
            if start >= len(content):
                return web.Response(status=416)
        body = content[start:]
        cut = self.cut.pop(0) if self.cut else None
        response = web.StreamResponse(status=status, headers={"Content-Length": str(len(body))})
        await response.prepare(request)
        await response.write(body if cut is None else body[:cut])
        if cut is not None and request.transport is not None:
            request.transport.abort()
            return response
        await response.write_eof()
        return response

    async def create(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = orjson.loads(raw)
        batch_id = f"batch_{len(self.batches)}"
        batch: dict[str, Any] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body.get("endpoint"),
            "status": "validating",
            "created_at": int(time.time()),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        if self.shape == "files":
            file_id = body.get("input_file_id")
            if file_id not in self.files:
                return _error(400, "no such input file")
            lines = [line for line in self.content[file_id].splitlines() if line.strip()]
            batch |= {"input_file_id": file_id, "output_file_id": None, "error_file_id": None, "errors": None}
            batch["metadata"] = body.get("metadata") if self.metadata else None
        else:
            if raw.find(b'"requests"') < max(raw.find(b'"model"'), raw.find(b'"endpoint"')):
                return _error(400, "endpoint and model must come before requests")
            self.posted.append(raw)
            lines = body["requests"]
            batch |= {"model": body["model"], "completion_window": "24h", "results": None, "error": None}
            if self.metadata:
                batch["metadata"] = body.get("metadata")
        batch["request_counts"]["total"] = len(lines)
        self.batches[batch_id] = batch
        return json(batch, status=202 if self.shape == "inline" else 200)

    async def list_batches(self, request: web.Request) -> web.Response:
        newest = list(reversed(self.batches.values()))
        after = request.query.get("after")
        if after:
            newest = newest[[b["id"] for b in newest].index(after) + 1 :]
        limit = int(request.query.get("limit", "20"))
        page = [{**b, "results": None} if self.shape == "inline" else b for b in newest[:limit]]
        return json(
            {
                "object": "list",
                "data": page,
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(newest) > limit,
            }
        )

    async def get(self, request: web.Request) -> web.Response:
        batch = self.batches.get(request.match_info["id"])
        if batch is None:
            return _error(404, "No batch found")
        if self.shape == "inline" and batch["status"] == "completed":
            batch = {**batch, "results": self.results.get(batch["id"], [])}
        return json(batch)

    async def page(self, request: web.Request) -> web.Response:
        batch_id = request.match_info["id"]
        if self.batches[batch_id]["status"] != "completed":
            return _error(409, "the batch has no results")  # (OpenRouter keeps none of a cancelled one)
        rows = self.results.get(batch_id, [])
        start = int(request.query.get("cursor", "0"))
        limit = int(request.query.get("limit", "100"))
        end = start + limit
        more = end < len(rows)
        return json(
            {
                "object": "list",
                "data": rows[start:end],
                "has_more": more,
                "next_cursor": str(end) if more else None,
            }
        )

    async def cancel(self, request: web.Request) -> web.Response:
        batch = self.batches[request.match_info["id"]]
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            return _error(409, "the batch has ended")
        batch["status"] = "cancelling"
        return json(batch)

    async def delete(self, request: web.Request) -> web.Response:
        kept = self.files if request.path.startswith("/v1/files/") else self.batches
        if kept.pop(request.match_info["id"], None) is None:
            return _error(404, "No such object")
        return json({"id": request.match_info["id"], "deleted": True})


@asynccontextmanager
async def fake_batches(shape: str, **options: Any) -> AsyncIterator[FakeBatches]:
    fake = FakeBatches(shape, **options)
    runner = web.AppRunner(fake.app(), access_log=None, handle_signals=False, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    fake.url = f"http://127.0.0.1:{port}/v1"
    try:
        yield fake
    finally:
        await runner.cleanup()
