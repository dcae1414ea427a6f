"""Time as the batch run waits by: the monotonic clock for waits, the wall clock for what a
provider dates; tests give a fake one (no test sleeps)."""

from __future__ import annotations

import time

import anyio


class Clock:
    """Time as the batch run waits by; tests give a fake one (no test sleeps)."""

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        """Seconds since the epoch: what a provider dates a batch by."""
        return time.time()

    async def wait(self, seconds: float | None, wake: anyio.Event) -> None:
        """`seconds` (None: for ever), or until `wake` is set."""
        if seconds is None:
            await wake.wait()
            return
        with anyio.move_on_after(seconds):
            await wake.wait()
