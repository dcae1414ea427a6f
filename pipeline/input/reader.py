"""Stream the input file, one line at a time, into requests or input errors.

Each line is made a request by `pipeline.input.line`. A line without an id gets one derived
from its bytes, so the same line gets the same id on every run (the n-th identical line gets
a `-n` suffix).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from pipeline.errors import InputError
from pipeline.input.line import LineParser, Parsed
from pipeline.input.pipe import PipeLines, is_pipe
from pipeline.input.shard import Shard
from pipeline.input.source import lines
from pipeline.job import Failure, Outcome, Request
from pipeline.output.ledger import Ledger
from pipeline.quote import quote
from pipeline.run.control import Refill
from pipeline.run.grouping import Grouping

YIELD_EVERY = 64  # lines: a long stretch of skipped lines does not hold the loop for long
# A refill of the request buffer yields once a refill batch (see `feed`), up to this many lines:
# about 15 ms of parsing, the longest the loop is held.
YIELD_MOST = 1024


def stable_id(raw: bytes) -> str:
    return "line-" + hashlib.blake2b(raw.strip(), digest_size=8).hexdigest()


def input_failure(
    error: InputError, *, line: int, custom_id: str | None = None, metadata: Any = None
) -> Failure:
    return Failure(
        line=line,
        code=error.code,
        message=error.message,
        custom_id=custom_id,
        metadata=metadata,
        extra={"field": error.field} if error.field else {},
    )


class ReadCounts:
    # (a plain class: a slots dataclass cost half a millisecond of every run's start to build)
    __slots__ = ("elsewhere", "empty", "finished", "read", "skipped", "total")

    def __init__(
        self,
        total: int | None = None,  # lines in the file, once counted
        read: int = 0,  # lines read so far
        empty: int = 0,
        skipped: int = 0,  # already in results.jsonl from an earlier run
        elsewhere: int = 0,  # another shard's lines (and, but for shard 1, the bad ones)
        finished: bool = False,  # the whole file was read
    ) -> None:
        self.total, self.read, self.empty, self.skipped = total, read, empty, skipped
        self.elsewhere, self.finished = elsewhere, finished


def read_requests(
    path: Path,
    parser: LineParser,
    ledger: Ledger,
    counts: ReadCounts,
    *,
    is_done: Callable[[str], bool] | None = None,
    source: Iterable[tuple[int, bytes | int] | None] | None = None,
    shard: Shard | None = None,
    yield_every: int = YIELD_EVERY,
) -> Iterator[Request | Failure | None]:
    """Every line still to do, as a request, and every bad line, as a failure; empty lines
    and ids already done (`is_done`, by default the ledger's) are counted and skipped. A
    None every `yield_every` lines, so that a long stretch of skipped lines does not hold
    the loop (and when `source`, the lines, has none ready yet)."""
    # Only ids done by earlier runs can come again: an id of this run is never read twice.
    done = is_done or (ledger.is_done if ledger.done_count else None)
    for line in source if source is not None else lines(path, max_bytes=parser.max_line_bytes):
        if line is None:
            yield None
            continue
        number, raw = line
        counts.read = number
        if number % yield_every == 0:
            yield None  # a chance for the loop to run other tasks, even when nothing is sent
        if isinstance(raw, int):
            if shard is not None and not shard.reports_bad_lines:
                counts.elsewhere += 1
                continue
            error = InputError(
                f"the line is {raw:,} bytes, over the limit of {parser.max_line_bytes:,}; "
                "shrink it (smaller images?) or raise max_line_bytes in the job file",
                code="line_too_long",
            )
            yield input_failure(error, line=number)
            continue
        if not raw.strip():
            counts.empty += 1
            continue
        custom_id: str | None = None
        parsed: Parsed | None = None
        try:
            try:
                parsed = parser.parse(raw)
            except InputError:
                if shard is not None and not shard.reports_bad_lines:
                    counts.elsewhere += 1
                    continue
                raise
            custom_id = parsed.custom_id
            if custom_id is None:
                derived = stable_id(raw)
                if shard is not None and not shard.owns(derived):
                    counts.elsewhere += 1
                    continue
                custom_id = ledger.see_copy(derived, number)
            else:
                if shard is not None and not shard.owns(custom_id):
                    counts.elsewhere += 1
                    continue
                earlier = ledger.see(custom_id, number)
                if earlier is not None:
                    raise InputError(
                        f"custom_id {quote(custom_id)} is already used on line {earlier}; "
                        "give every line its own custom_id",
                        field="custom_id",
                        code="duplicate_custom_id",
                    )
            if done is not None and done(custom_id):
                counts.skipped += 1
                continue
            yield parser.request(parsed, custom_id=custom_id, line=number)
        except InputError as e:
            metadata = parsed.metadata if parsed is not None else e.metadata
            yield input_failure(e, line=number, custom_id=custom_id or e.custom_id, metadata=metadata)
    counts.finished = True


async def feed(
    path: Path,
    parser: LineParser,
    ledger: Ledger,
    requests: MemoryObjectSendStream[Request],
    failures: MemoryObjectSendStream[Outcome],
    counts: ReadCounts,
    refill: Refill | None = None,
    grouping: Grouping | None = None,
) -> None:
    """Send every line still to do to the workers, and every bad line to the writer.
    Stops early when the receiving side closes (the run stopped dispatching). With `refill`,
    a full request buffer is topped up by halves (see `Refill`). With `grouping`, lines that
    share a long prefix are held there and go with their kin (see `run.grouping`)."""
    pipe = PipeLines(lambda: lines(path, max_bytes=parser.max_line_bytes)) if is_pipe(path) else None
    # One pass of the loop may take a whole batch (every request in flight answered at
    # once): a reader that yields sooner leaves the workers an empty buffer, each then
    # waiting for its next line and woken for it alone (at 0 ms answers and 64 lines a
    # yield: 8,400 such waits in 10,000 requests, each an event made, set and awaited).
    every = min(max(YIELD_EVERY, refill.batch), YIELD_MOST) if refill is not None else YIELD_EVERY
    async with requests, failures:
        for item in read_requests(
            path, parser, ledger, counts, source=pipe, shard=parser.shard, yield_every=every
        ):
            if item is None:
                await (pipe.wait() if pipe is not None else anyio.lowlevel.checkpoint())
                continue
            # (a request handed over here, not in a coroutine of its own: every line comes here)
            try:
                if not isinstance(item, Request):
                    await _send(failures, item)
                    continue
                if grouping is not None and item.prefix is not None:
                    if grouping.full(len(item.payload)):
                        await grouping.room(len(item.payload))
                    grouping.add(item)  # (it goes with its kin, handed to a worker from there)
                    continue
                if refill is not None:
                    size = len(item.payload)
                    while not refill.fits(size):
                        await refill.room(1)  # the buffer holds its bytes' worth: wait for a take
                    refill.put(size)
                try:
                    requests.send_nowait(item)
                except anyio.WouldBlock:
                    if refill is not None:
                        await refill.room()  # until half the buffer is taken: room for a batch
                    await requests.send(item)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                return  # the other side is gone: the run stopped dispatching
        if grouping is not None:
            await grouping.drain()  # the held lines go before the workers learn the input ended


async def _send(stream: MemoryObjectSendStream[Outcome], item: Outcome) -> None:
    try:
        stream.send_nowait(item)
    except anyio.WouldBlock:
        await stream.send(item)
