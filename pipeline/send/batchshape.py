"""What the two batch shapes (`batchfiles`, `batchinline`) do alike over one HTTP session:
finding a batch again by its tag, reading the list of batches, cancelling. Each shape adds
how it submits, looks at one batch and reads results."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection

from pipeline.send import batchlist
from pipeline.send.batchapi import BatchInfo, BatchPage
from pipeline.send.batchfind import find
from pipeline.send.batchhttp import BatchHttp


class Shape:
    shape: str  # "files" or "inline"

    def __init__(
        self, http: BatchHttp, *, max_lines: int, max_bytes: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._http = http
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._clock = clock

    async def get(self, batch_id: str) -> BatchInfo:
        raise NotImplementedError

    async def find(
        self,
        tag: str,
        *,
        since: float,
        model: str | None = None,
        lines: int | None = None,
        taken: Collection[str] = (),
    ) -> BatchInfo | None:
        return await find(self._http, tag, since=since, model=model, lines=lines, taken=taken)

    async def page(self, after: str | None = None) -> BatchPage | None:
        return await batchlist.page(self._http, after, files=self.shape == "files")

    async def cancel(self, batch_id: str) -> BatchInfo:
        return await self._http.cancel(batch_id, self.get)
