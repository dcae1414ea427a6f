"""OpenAI's batch API (also Azure's, Groq's, Together's and others'): the staged JSONL file
uploaded (`POST {base}/files`, purpose `batch`, streamed from disk), a batch made of it
(`POST {base}/batches`, tagged in its metadata), and its answers read from its output and
error files (`GET {base}/files/{id}/content`, line by line).

An upload whose answer is lost is simply made again: the file left behind is an orphan
that costs nothing, named `<tag>.jsonl`. A create is never simply made again
(`BatchHttp.create`). A batch taken in has its three files deleted (`clear`,
`pipeline.batch.clear`): the prompts and answers are the user's, not the provider's to keep.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from pathlib import Path
from typing import IO

import aiohttp

from pipeline.errors import MalformedResponse
from pipeline.quote import brief
from pipeline.send.batchapi import TAG_KEY, BatchInfo
from pipeline.send.batchdownload import lines
from pipeline.send.batchfind import find
from pipeline.send.batchhttp import BatchHttp
from pipeline.send.batchshape import Shape
from pipeline.send.batchwire import info_of

ENDPOINT = "/v1/chat/completions"
WINDOW = "24h"
MAX_LINES = 50_000  # OpenAI's limits for one batch
MAX_BYTES = 200 * 1000 * 1000


class FilesBatchApi(Shape):
    shape = "files"

    def __init__(
        self,
        http: BatchHttp,
        *,
        max_lines: int = MAX_LINES,
        max_bytes: int = MAX_BYTES,
        max_line: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(http, max_lines=max_lines, max_bytes=max_bytes, clock=clock)
        self._max_line = max_line

    async def check(self) -> None:
        await self._http.check("/files", "/batches")

    async def submit(self, staged: Path, *, tag: str, model: str, lines: int) -> BatchInfo:
        since = self._clock()
        file_id, uploaded = await self._upload(staged, tag)
        if uploaded is not None:
            # The batch is looked for by the provider's clock where it tells it: a machine's
            # may run minutes ahead, past the listing's minute of skew.
            since = min(since, uploaded)
        request = {
            "input_file_id": file_id,
            "endpoint": ENDPOINT,
            "completion_window": WINDOW,
            "metadata": {TAG_KEY: tag},
        }

        async def make() -> BatchInfo:
            return info_of(await self._http.once("POST", "/batches", json=request, collection=True))

        # Looked for by its file too: a provider may keep no metadata, and list it as null.
        def look() -> Awaitable[BatchInfo | None]:
            return find(self._http, tag, since=since, model=None, lines=None, made_of=file_id)

        return await self._http.create(tag, make, look)

    async def _upload(self, staged: Path, tag: str) -> tuple[str, float | None]:
        """The file's id, and when the provider says it made it."""
        opened: list[IO[bytes]] = []

        def form() -> aiohttp.FormData:
            # A file object: aiohttp sends it in blocks as it reads them (200 MB never held).
            f = staged.open("rb")
            opened.append(f)
            data = aiohttp.FormData()
            data.add_field("purpose", "batch")
            data.add_field("file", f, filename=f"{tag}.jsonl", content_type="application/jsonl")
            return data

        try:
            answer = await self._http.call("POST", "/files", body=form, slow=True, collection=True)
        finally:
            for f in opened:
                f.close()
        file_id = answer.get("id") if isinstance(answer, dict) else None
        if not isinstance(file_id, str) or not file_id:
            raise MalformedResponse("the answer to the upload names no file", body=brief(str(answer)))
        made = answer.get("created_at")
        return file_id, float(made) if isinstance(made, int | float) and not isinstance(made, bool) else None

    async def get(self, batch_id: str) -> BatchInfo:
        return info_of(await self._http.call("GET", f"/batches/{batch_id}"))

    async def clear(self, batch_id: str, files: Collection[str]) -> None:
        for file_id in dict.fromkeys(files):  # (a failure stops it: the next run tries again)
            await self._http.delete(f"/files/{file_id}")

    async def results(self, info: BatchInfo) -> AsyncIterator[bytes]:
        if info.counts.completed and not info.output_file:
            # Read as none, its answers would be left undone and sent again: paid twice.
            raise MalformedResponse(
                f"batch {info.id} ended {info.status} with {info.counts.completed:,} lines answered "
                "but names no output file"
            )
        for file_id in (info.output_file, info.error_file):
            if file_id:
                async for line in lines(self._http, f"/files/{file_id}/content", max_line=self._max_line):
                    yield line
