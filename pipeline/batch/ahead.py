"""A batch's result lines read ahead of their judging: a reader task fetches them (the next page
of an inline batch's results asked for, the next blocks of a download read) while the lines
before are judged and written, in runs of `per`. Judging holds the event loop, so the reader
runs whenever the judge waits for a run; it then puts what it has into runs without yielding
while there is room (`runs` runs waiting), so that a page in is turned into runs at once and
the next page asked for then, while the page before is still to judge: the server's time to
answer is no longer the merge's (the inline shape spent a quarter of its taking in waiting on
its pages; with a yield at each run put, the next page was asked for only once the judge
had come back for a run of the page before).

Memory stays bounded: `runs` runs waiting, the one being judged, the one being filled, and
what the API holds of a page (an inline page of 1,000 results).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

T = TypeVar("T")


@asynccontextmanager
async def read_ahead(
    lines: AsyncIterator[T], *, per: int, runs: int = 4
) -> AsyncIterator[AsyncIterator[list[T]]]:
    """The lines, in runs of `per`, read ahead (see the module's text). A failure to read (a
    `RequestError`: the download cut past its retries) is raised where the runs are read, once
    those read before it have been given: as reading the lines themselves would raise it."""
    send, receive = anyio.create_memory_object_stream[list[T]](runs)
    failed: list[Exception] = []

    async def read() -> None:
        with send:
            run: list[T] = []
            try:
                async for line in lines:
                    run.append(line)
                    if len(run) >= per:
                        await _put(send, run)
                        run = []
                if run:
                    await send.send(run)
            except Exception as e:  # (raised to the judge, in its task: not the reader's to end the run)
                failed.append(e)
            finally:
                close = getattr(lines, "aclose", None)
                if close is not None:
                    with anyio.CancelScope(shield=True):
                        await close()

    raised: Exception | None = None
    with receive:
        async with anyio.create_task_group() as tg:
            tg.start_soon(read)
            try:
                yield _Runs(receive, failed)
            except Exception as e:  # the judge's: raised as it came, not in a group of the reader's
                raised = e
            finally:
                tg.cancel_scope.cancel()  # (a judge that stops early: the rest is not read)
    if raised is not None:
        raise raised


async def _put(send: MemoryObjectSendStream[list[T]], run: list[T]) -> None:
    """`run` sent, without yielding where there is room: the reader goes on to ask for the next
    page as soon as a page is in, rather than a run of it each time the judge waits."""
    try:
        send.send_nowait(run)
    except anyio.WouldBlock:
        await send.send(run)


class _Runs(Generic[T]):
    """The runs as they come, then the reader's failure, if it had one."""

    def __init__(self, receive: MemoryObjectReceiveStream[list[T]], failed: list[Exception]) -> None:
        self._receive, self._failed = receive, failed

    def __aiter__(self) -> _Runs[T]:
        return self

    async def __anext__(self) -> list[T]:
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            if self._failed:
                raise self._failed[0] from None
            raise StopAsyncIteration from None
