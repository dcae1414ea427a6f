"""The lines of an input that is a pipe, read by a thread of their own.

Reading a file never waits for long; reading a pipe waits for whoever writes into it, for as
long as they take. In the event loop's thread that wait would hold everything else up:
answers arriving, the progress bar, even a Ctrl-C. So a thread reads the pipe's lines into a
small queue and the reader takes them from there, awaiting only when the queue is empty. The
thread wakes the loop only when the reader waits, not for every line.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.input.stdin import STDIN

QUEUE = 64  # lines read ahead (a line may be megabytes: few)
_END = object()


class PipeLines:
    """`(number, line)` pairs from `read` (run in a thread), or None when none is ready yet:
    then `wait()` until one is."""

    def __init__(self, read: Callable[[], Iterator[Any]]) -> None:
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=QUEUE)
        self._loop = asyncio.get_running_loop()
        self._ready = asyncio.Event()
        self._waiting = False
        thread = threading.Thread(target=self._pump, args=(read,), name="pipeline-input", daemon=True)
        thread.start()

    def _pump(self, read: Callable[[], Iterator[Any]]) -> None:
        try:
            for item in read():
                self._put(item)
        except BaseException as e:  # the reader raises it in the loop's thread
            self._put(e)
        self._put(_END)

    def _put(self, item: Any) -> None:
        self._queue.put(item)
        if self._waiting:
            self._waiting = False
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody to wake
                self._loop.call_soon_threadsafe(self._ready.set)

    def __iter__(self) -> Iterator[Any]:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                self._ready.clear()
                self._waiting = True
                if self._queue.empty():  # (the thread may have put one meanwhile)
                    yield None
                continue
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def wait(self) -> None:
        """Until a line (or the end) is ready."""
        if self._waiting and self._queue.empty():
            await self._ready.wait()
        else:
            await asyncio.sleep(0)


def is_pipe(path: Path) -> bool:
    """Standard input, or anything that is not a regular file: a named pipe, /dev/stdin from
    a pipe... (read once, by a thread: it may wait for whoever writes into it)."""
    return path == STDIN or (path.exists() and not path.is_file() and not path.is_dir())
