"""Time as the batch run waits by: the monotonic clock for waits, the wall clock for what a
provider dates; tests give a fake one (no test sleeps)."""

from __future__ import annotations

import time

import anyio

FIRST_LOOK = 2.0  # seconds from a batch's submission to the first look at it (at most a poll)


def next_look(ran: float, poll: float) -> float:
    """Seconds from a look at a running batch to the next, where it has run `ran` seconds: as
    long as that (`FIRST_LOOK` at least, `poll` at most). One that fails validation in two
    seconds, or a small one done in ten, is seen then rather than a poll after its submission
    (30 s by default); the looks come 2, 4, 8, 16 and 32 s after it, then a poll apart, as
    before: four more in its first half minute, and none once it has run a poll.
    """
    return min(poll, max(FIRST_LOOK, ran))


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
