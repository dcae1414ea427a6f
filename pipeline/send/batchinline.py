"""The inline batch API (OpenRouter's `POST /api/v1/batches`, and gateways of the same
shape): one model a batch, its requests posted in the body, its answers read back from the
batch. As OpenRouter documents it:

    POST {base}/batches           {"endpoint", "model", "completion_window", "requests":
                                  [{"custom_id", "body"}]}: endpoint and model before requests
                                  (it stream-parses, and answers 400 otherwise); 202, status
                                  "validating"; at most 5,000 requests and 200 MB
    GET {base}/batches/{id}       the batch; once ended, every answer in `results` too
    GET {base}/batches/{id}/results?cursor=C   the answers a page at a time: {"data",
                                  "has_more", "next_cursor"}, stable across retries
    GET {base}/batches            newest first, `after` the last id; no results, no metadata
    POST {base}/batches/{id}/cancel   403 where not enabled; 409 once ended

The body is streamed from the staged file, line by line, never held whole; a look at a
batch reads its status past its `results` (`batchwire.WithoutMember`). The tag goes in
`metadata` for gateways that keep it (Merge's does; OpenRouter's schema has no such field: a
400 that names it, and the batch is sent without it from then on). A batch without its tag is
found by its model, size and time (`batchfind.pick`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Collection
from functools import partial
from pathlib import Path
from typing import Any

from pipeline.errors import HTTPStatusError, MalformedResponse
from pipeline.input.jsonl import dumps, loads
from pipeline.quote import brief
from pipeline.send.batchapi import TAG_KEY, BatchInfo, ResultLine
from pipeline.send.batchhttp import BatchHttp
from pipeline.send.batchshape import Shape
from pipeline.send.batchwire import info_of, output_item

ENDPOINT = "/v1/chat/completions"
WINDOW = "24h"
MAX_LINES = 5_000  # OpenRouter's limits for one batch
MAX_BYTES = 200 * 1000 * 1000
PAGE = 1_000  # results a page (OpenRouter's most): what a page holds is held at once
_BLOCK = 1 << 16


class InlineBatchApi(Shape):
    shape = "inline"

    def __init__(
        self,
        http: BatchHttp,
        *,
        max_lines: int = MAX_LINES,
        max_bytes: int = MAX_BYTES,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(http, max_lines=max_lines, max_bytes=max_bytes, clock=clock)
        self._metadata = True  # sent until the endpoint refuses it

    async def check(self) -> None:
        await self._http.check("/batches")

    async def submit(self, staged: Path, *, tag: str, model: str, lines: int) -> BatchInfo:
        since = self._clock()

        async def make() -> BatchInfo:
            try:
                return await self._post(staged, model, tag)
            except HTTPStatusError as e:
                # OpenRouter's schema has no metadata: an endpoint that refuses the field (a
                # 400 names it) made nothing, and is sent the batch again without it.
                if not (self._metadata and e.status == 400 and "metadata" in e.message.lower()):
                    raise
            self._metadata = False
            return await self._post(staged, model, None)

        return await self._http.create(
            tag, make, lambda: self.find(tag, since=since, model=model, lines=lines)
        )

    async def _post(self, staged: Path, model: str, tag: str | None) -> BatchInfo:
        head: dict[str, object] = {"endpoint": ENDPOINT, "model": model, "completion_window": WINDOW}
        if tag is not None and self._metadata:
            head["metadata"] = {TAG_KEY: tag}
        answer = await self._http.once(
            "POST",
            "/batches",
            body=lambda: _body(staged, head),
            headers={"Content-Type": "application/json"},
            slow=True,
            collection=True,
        )
        return info_of(answer)

    async def get(self, batch_id: str) -> BatchInfo:
        # (read past its `results`: a finished batch holds every answer there)
        return info_of(await self._http.call("GET", f"/batches/{batch_id}", without=b"results"))

    async def clear(self, batch_id: str, files: Collection[str]) -> None:
        await self._http.delete(f"/batches/{batch_id}")  # (no files: the batch holds them)

    async def results(self, info: BatchInfo) -> AsyncIterator[ResultLine]:
        """The ended batch's answers, a page at a time from /results; where there are none to
        page (no such path at a gateway, or no rows for a batch that did not complete), those
        the batch itself holds, if any (then held whole: it is how such a gateway gives them)."""
        if info.status == "failed":
            return  # failed at validation: nothing ran
        cursor: str | None = None
        read: set[str] = set()
        while True:
            page = await self._http.retry(partial(self._page, info.id, cursor))
            if page is None:
                async for line in self._inline(info.id):
                    yield line
                return
            data = page.get("data") if isinstance(page, dict) else None
            if not isinstance(data, list):
                raise MalformedResponse("a page of results is not a list", body=brief(str(page)))
            for item in data:
                yield output_item(item)
            cursor = page.get("next_cursor")
            if not page.get("has_more") or not isinstance(cursor, str) or not cursor:
                return
            if cursor in read:  # its lines would come again, and again
                raise MalformedResponse(
                    f"the results of batch {info.id} give back a cursor already read", body=brief(cursor)
                )
            read.add(cursor)

    async def _page(self, batch_id: str, cursor: str | None) -> Any:
        """A page of results; None where the first has none to give: a 404 (no /results at
        this gateway), a 409 or 410 (a batch that did not complete: OpenRouter keeps no rows
        of a cancelled one). (A 409 is otherwise transient: asked again, it stays a 409.)"""
        params = {"limit": str(PAGE)} | ({"cursor": cursor} if cursor else {})
        try:
            return await self._http.once("GET", f"/batches/{batch_id}/results", params=params)
        except HTTPStatusError as e:
            if cursor is None and e.status in (404, 409, 410):
                return None
            raise

    async def _inline(self, batch_id: str) -> AsyncIterator[ResultLine]:
        batch = await self._http.call("GET", f"/batches/{batch_id}")
        results = batch.get("results") if isinstance(batch, dict) else None
        for item in results if isinstance(results, list) else ():
            yield output_item(item)


async def _body(staged: Path, head: dict[str, object]) -> AsyncIterator[bytes]:
    """The batch's body, endpoint and model first, each staged line `{"custom_id", "method",
    "url", "body"}` posted as `{"custom_id", "body"}`, read from disk as it is sent."""
    block = bytearray(dumps(head)[:-1] + b',"requests":[')
    comma = b""
    with staged.open("rb") as f:
        for raw in f:
            if not raw.strip():
                continue
            line = loads(raw)
            block += comma + dumps({"custom_id": line["custom_id"], "body": line["body"]})
            comma = b","
            if len(block) >= _BLOCK:
                yield bytes(block)
                block.clear()
    yield bytes(block + b"]}")
