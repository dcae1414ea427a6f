"""The hold of `run.grouping` as its reader sees it: the lines kept back (held, or released and
not yet taken) make the read-ahead window, bounded in lines and in payload bytes, as the
workers' buffer is.

    hold.put(size)     a line comes in (held, or released into the grouping's `ready`)
    hold.left(size)    one leaves (taken by a worker, or moved on)
    hold.full(size)    whether a line of `size` bytes finds it full
    await room(size)   the reader's wait for room: once full, until an eighth of it is free
    await drain(empty) the reader's, at the end of the input: until `empty()` (nothing held)
    hold.stop()        the run stopped dispatching: every wait ends

With the hold full, the reader waits for an eighth of it rather than for each line taken: woken
at each line to read one more, it took more CPU than grouping saved wall time (answers in 20 ms:
0.3 s in 10,000 lines; the workers' buffer is topped up by halves for the same reason,
`run.control.Refill`). Something held always moves on (each held line waits for an answer in
flight, or for a turn that one will end), so the wait ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Hold:
    def __init__(self, most: int, max_bytes: int) -> None:
        self.most, self.max_bytes = most, max_bytes
        self.lines = 0  # kept: held, or released and not yet taken
        self.bytes = 0  # their payload's
        self.stopped = False
        self._changed: asyncio.Future[None] | None = None  # the reader waits on it (`_change`)
        self._until: Callable[[], bool] = lambda: True  # ...until this holds

    def put(self, size: int) -> None:
        self.lines += 1
        self.bytes += size

    def left(self, size: int) -> None:
        self.lines -= 1
        self.bytes -= size
        future = self._changed
        if future is not None and not future.done() and self._until():
            future.set_result(None)

    def full(self, size: int) -> bool:
        lines = self.lines
        return lines >= self.most or (lines > 0 and self.bytes + size > self.max_bytes)

    async def room(self, size: int) -> None:
        while self.full(size) and not self.stopped:
            await self._change(self._roomy)

    def _roomy(self) -> bool:
        return self.lines <= self.most - self.most // 8 and self.bytes <= self.max_bytes - self.max_bytes // 8

    async def drain(self, empty: Callable[[], bool]) -> None:
        while not empty() and not self.stopped:
            await self._change(empty)

    def stop(self) -> None:
        self.stopped = True
        future = self._changed
        if future is not None and not future.done():
            future.set_result(None)

    async def _change(self, until: Callable[[], bool]) -> None:
        self._until = until
        self._changed = asyncio.get_running_loop().create_future()
        try:
            await self._changed
        finally:
            self._changed = None
