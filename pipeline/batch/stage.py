"""Staging: requests into batch files, OUT/batches/<n>.jsonl, one model a file, each line
OpenAI's batch input line (`custom_id`, `method`, `url`, `body`: the payload as it would be
sent, local images inlined). A file is cut at the API's `max_lines` and `max_bytes` and at
the end of the input, synced, then marked staged in the book. Streamed: a line is written as
it comes, and its listing (id, line number, tries, metadata) goes to the book in small runs,
so no batch is ever held in memory whole.

The book lists a file's lines while it fills (`book.FILLING`): a batch killed filling was
never sent, and its lines are staged again by the next run.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import anyio
import orjson
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.account.books import Books
from pipeline.batch.book import Book
from pipeline.batch.twins import Twins
from pipeline.errors import InputError
from pipeline.input.reader import input_failure
from pipeline.job import Failure, Outcome, Request, Success

URL = "/v1/chat/completions"
_HEAD = b'{"custom_id":'
_BODY = b',"method":"POST","url":"' + URL.encode() + b'","body":'
LIST_EVERY = 1024  # lines listed in the book at once


# Content parts other than text, as a request's JSON spells their type. (Inside a string
# value, a quote is escaped: `"image_url"` there reads `\"image_url\"`, which this is not.)
_PICTURED = (b'"image_url"', b'"input_audio"', b'"file"', b'"video_url"')


def pictured(payload: bytes) -> bool:
    """Whether a request carries an image (given by URL), audio, a file or a video. Where the
    batches are text only (OpenRouter's docs have said so; elsewhere, that URL images pass
    where the provider the batch routes to fetches them), a batch holding one fails validation
    whole: such lines go in batches of their own, so that a refusal fails them alone, not the
    text lines they were with."""
    return any(kind in payload for kind in _PICTURED)


def batch_line(custom_id: str, payload: bytes) -> bytes:
    """OpenAI's batch input line for a request (its payload copied in as it is)."""
    return b"".join((_HEAD, orjson.dumps(custom_id), _BODY, payload, b"}\n"))


class _Filling:
    __slots__ = ("file", "lines", "listing", "n", "size", "worst")

    def __init__(self, n: int, file: IO[bytes]) -> None:
        self.n, self.file = n, file
        self.lines = self.size = 0
        self.worst = 0.0  # what its lines may cost at most (--max-cost); inf: not known
        self.listing: list[tuple[str, int, int, Any]] = []


class Files:
    """Batch files being filled, one per model, cut when full."""

    def __init__(self, book: Book, *, max_lines: int, max_bytes: int, text_only: bool = False) -> None:
        self.book = book
        self.text_only = text_only  # the batches take no image (OpenRouter's inline ones)
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._open: dict[tuple[str, bool], _Filling] = {}  # (model, apart) -> its file
        # False: a batch cut is left filling, and noted in `cut` (n, lines, bytes), for a
        # caller that marks it staged in a commit of its own (the lines of a batch taken in).
        self.mark_staged = True
        self.cut: list[tuple[int, int, int, float]] = []
        self.last = 0  # the batch the last line put went in
        book.folder.mkdir(parents=True, exist_ok=True)

    def fits(self, size: int) -> bool:
        return size <= self.max_bytes

    async def put(
        self,
        model: str,
        custom_id: str,
        line: int,
        tries: int,
        metadata: Any,
        data: bytes,
        worst: float | None = 0.0,
        *,
        apart: bool = False,
    ) -> int | None:
        """Write one line to its model's file (`worst`: what it may cost at most, None when
        that cannot be told); the number of a batch this cut (full), if any. `apart`: in a
        file of its model's kept for such lines (`pictured`)."""
        key = (model, apart)
        filling = self._open.get(key)
        cut: int | None = None
        if filling is not None and (
            filling.lines >= self.max_lines or filling.size + len(data) > self.max_bytes
        ):
            cut = await self._close(key)
            filling = None
        if filling is None:
            n = self.book.open(model)
            filling = self._open[key] = _Filling(n, self.book.path(n).open("wb"))
        filling.file.write(data)
        filling.lines += 1
        filling.size += len(data)
        filling.worst += math.inf if worst is None else worst
        filling.listing.append((custom_id, line, tries, metadata))
        self.last = filling.n
        if len(filling.listing) >= LIST_EVERY:
            self._list(filling)
        return cut

    async def finish(self) -> list[int]:
        """Cut every file still open (the end of the input); their numbers, in order."""
        return [await self._close(key) for key in list(self._open)]

    def abandon(self) -> None:
        """Close the files without staging them (a stop): they stay filling, to be forgotten."""
        for filling in self._open.values():
            with contextlib.suppress(OSError):
                filling.file.close()
        self._open.clear()

    def _list(self, filling: _Filling) -> None:
        self.book.list_lines(filling.n, filling.listing)
        filling.listing = []

    async def _close(self, key: tuple[str, bool]) -> int:
        filling = self._open.pop(key)
        try:
            filling.file.flush()
            await anyio.to_thread.run_sync(os.fsync, filling.file.fileno())
        finally:
            filling.file.close()
        await anyio.to_thread.run_sync(_sync_dir, self.book.folder)
        self._list(filling)
        if self.mark_staged:
            self.book.staged(filling.n, lines=filling.lines, size=filling.size, reserved=filling.worst)
        else:
            self.cut.append((filling.n, filling.lines, filling.size, filling.worst))
        return filling.n


def _sync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def stage(
    requests: MemoryObjectReceiveStream[Request],
    failures: MemoryObjectSendStream[Outcome],
    files: Files,
    *,
    books: Books,
    live: Callable[[str], bool] | None,
    staged: Callable[[int], bool],
    worst: Callable[[Request], float | None] | None = None,
    kept: Callable[[Request], tuple[bytes | None, Success | None]] | None = None,
    twins: Twins | None = None,
) -> None:
    """Every request read into a batch file; each batch cut is committed staged and handed on
    (`staged(n)`, which says whether to go on: False once the book could not be committed).
    `live`: whether an id is in a live batch already (a resumed run's), then not staged.
    `worst`: what a request may cost at most (None: not known), where `--max-cost` holds.
    `kept`: the request's answer from the answer cache (its images inlined first, as sent),
    then written as reused by the writer (`failures` carries every outcome), not staged; with
    its key (None: a line a --redo chose, neither looked up nor twinned). `twins`: a request of the same key as one staged before it and not taken in yet
    is listed as its twin, not staged (`pipeline.batch.twins`)."""
    async with requests, failures:
        async for request in requests:
            if live is not None and live(request.custom_id):
                continue  # its batch is followed and taken in as it is
            # (a line with local images where the batches take none: failed, unless the
            # answer cache holds its answer, looked up with them inlined as a run sends them)
            unbatched = request.images is not None and files.text_only
            if unbatched and kept is None:
                await failures.send(_no_images(request))
                continue
            if request.images is not None:
                failure = await _fill(request, books)
                if failure is not None:
                    await failures.send(failure)
                    continue
            key = None
            if kept is not None:
                key, hit = kept(request)
                if hit is not None:
                    await failures.send(hit)
                    continue
                if twins is not None and key is not None and not unbatched and twins.attach(key, request):
                    continue
                if unbatched:
                    await failures.send(_no_images(request))
                    continue
            data = batch_line(request.custom_id, request.payload)
            if not files.fits(len(data)):
                await failures.send(_too_big(request, len(data), files.max_bytes))
                continue
            most = worst(request) if worst is not None else 0.0
            cut = await files.put(
                request.model,
                request.custom_id,
                request.line,
                1,
                request.metadata,
                data,
                most,
                apart=files.text_only and pictured(request.payload),
            )
            if twins is not None and key is not None:
                twins.lead(key, files.last)
            if cut is not None and not staged(cut):
                return
        for n in await files.finish():
            if not staged(n):
                return


async def _fill(request: Request, books: Books) -> Failure | None:
    """The request's local images read, sized and inlined now: a batch file carries them."""
    from pipeline.input.imagedata import encode  # (only a job with local images comes here)

    images, request.images = request.images or [], None
    payload = request.payload
    try:
        for image in images:
            url, read, sent = await anyio.to_thread.run_sync(encode, image)
            payload = payload.replace(image.marker, url, 1)
            books.image(read, sent)
    except InputError as e:
        return input_failure(e, line=request.line, custom_id=request.custom_id, metadata=request.metadata)
    request.payload = payload
    return None


def _no_images(request: Request) -> Failure:
    """A line with images where the batches take none: failed alone, not sent (in a batch, it
    would fail the validation of the whole batch, and every line of it with it)."""
    return Failure(
        line=request.line,
        code="images_not_batched",
        message="not sent: the endpoint's inline batch API (OpenRouter's) takes no images; send "
        "it with --tier sync",
        custom_id=request.custom_id,
        metadata=request.metadata,
        model=request.model,
        unsent=True,
    )


def _too_big(request: Request, size: int, most: int) -> Failure:
    return Failure(
        line=request.line,
        code="too_large_for_batch",
        message=f"not sent: the request is {size:,} bytes as a batch line, over a batch's "
        f"{most:,} (the batch API's, or batch_max_bytes); send it with --tier sync",
        custom_id=request.custom_id,
        metadata=request.metadata,
        model=request.model,
        unsent=True,
    )
