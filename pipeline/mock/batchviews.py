"""How the mock's batches look on the wire: OpenAI's batch object (the files shape) and
OpenRouter's (the inline shape: its results in the batch once ended, or a page at a time).

An inline batch's results are streamed from disk into the answer (never built whole); its
pages are `batchpages`'."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from pipeline.mock.batches import ENDED, MockBatch


def files_object(batch: MockBatch, status: str, done: int) -> dict[str, Any]:
    ending = batch.ending
    errors = batch.checked.errors
    return {
        "id": batch.id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "model": batch.model,
        "errors": {"object": "list", "data": errors} if errors and status == "failed" else None,
        "input_file_id": batch.input_file_id,
        "completion_window": "24h",
        "status": status,
        "output_file_id": ending.output_file_id if ending else None,
        "error_file_id": ending.error_file_id if ending else None,
        **batch.times(status),
        "request_counts": batch.counts(status, done),
        "metadata": batch.metadata,
    }


def inline_object(batch: MockBatch, status: str, done: int, *, listed: bool = False) -> dict[str, Any]:
    """OpenRouter's batch object, `results` left empty (`with_results` fills them in)."""
    if listed and status in ("finalizing", "cancelling"):
        status = "in_progress"  # OpenRouter's list keeps those two phases as in_progress
    ended = status in ENDED
    times = batch.times(status)
    finalized = next(
        (times[k] for k in ("completed_at", "expired_at", "cancelled_at", "failed_at") if times[k]), None
    )
    doc: dict[str, Any] = {
        "id": batch.id,
        "object": "batch",
        "endpoint": "/v1/chat/completions",
        "model": batch.model,
        "status": status,
        "completion_window": "24h",
        "created_at": times["created_at"],
        "finalized_at": finalized if ended else None,
        "error": _why_failed(batch) if status == "failed" else None,
        "request_counts": batch.counts(status, done),
        "usage": batch.ending.usage if ended and batch.ending and status != "failed" else None,
    }
    if batch.metadata is not None:
        doc["metadata"] = batch.metadata
    if not listed:
        doc["results"] = []
    return doc


def _why_failed(batch: MockBatch) -> dict[str, str]:
    said = [
        f"requests[{e['line'] - 1}]: {e['message']}" if e["line"] else e["message"]
        for e in batch.checked.errors
    ]
    return {"message": "; ".join(said)}


async def with_results(request: web.Request, doc: dict[str, Any], results: Path | None) -> web.StreamResponse:
    """`doc` with its `results` array read from disk as it is sent."""
    head = orjson.dumps(doc)
    if results is None or not head.endswith(b'"results":[]}'):
        return web.Response(body=head, content_type="application/json")
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    await response.write(head[: -len(b"]}")])
    first = True
    with results.open("rb") as lines:
        for line in lines:
            await response.write((b"" if first else b",") + line.rstrip(b"\n"))
            first = False
    await response.write(b"]}")
    await response.write_eof()
    return response
