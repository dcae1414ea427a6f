"""Looking at many running batches in one call: the endpoint's list of batches (`BatchApi.page`,
newest first) describes each with its status and counts, so a follower of twenty batches sees
them all in one look, where a look at each alone (at most one a second in all) found the last
of twenty ended twenty seconds late.

A look is one page. Where the batches due are not all on it, the next look reads the page
after (a sweep), until each is found, the list ends, or it reaches batches made before the
oldest of them (less `SKEW`); one not found so is looked at alone (`BatchApi.get`), once, and
looked for in the list again after. An endpoint that lists nothing usable is not asked again.
"""

from __future__ import annotations

from collections.abc import Mapping

from pipeline.send.batchapi import BatchApi, BatchInfo

SKEW = 600.0  # seconds: the provider's clock may be this far behind ours (as a submission's)


class Sweep:
    def __init__(self, api: BatchApi) -> None:
        self.api = api
        self.usable = True  # the endpoint lists its batches
        self.after: str | None = None  # a sweep under way: the cursor of its next page
        self.alone: set[int] = set()  # batches the list did not show: each looked at alone, once
        # When the sweep under way read its first page: each batch it shows is looked at again
        # a poll after that, all at once (dated by its own page, they would drift apart a
        # second a page, and sweeps would start over every second)
        self.began = 0.0
        self.shown: set[int] = set()  # the batches the sweep under way has shown so far

    def wants(self, n: int, running: int) -> bool:
        """Whether batch n's look is a page of the list (one running batch is looked at alone:
        a list of a hundred says no more of it)."""
        return self.usable and running > 1 and n not in self.alone

    async def look(
        self, running: Mapping[str, int], due: set[int], made: Mapping[int, float | None], *, now: float
    ) -> dict[int, BatchInfo] | None:
        """One page: the running batches it shows (`running`: their ids' numbers), by number;
        None where the endpoint lists nothing usable. Of those `due` not shown, the next look
        reads on, or each is looked at alone (see the module's text). `made`: when each batch's
        creation was asked for (epoch seconds), where known."""
        if self.after is None:
            self.began, self.shown = now, set()
        page = await self.api.page(self.after)
        if page is None:
            self.usable, self.after = False, None
            return None
        found = {running[info.id]: info for info in page.batches if info.id in running}
        self.shown |= found.keys()
        missing = due - self.shown
        times = [made.get(n) for n in missing]
        oldest = min((t for t in times if t is not None), default=None)
        reached = page.oldest is not None and oldest is not None and page.oldest < oldest - SKEW
        if missing and page.after is not None and not reached:
            self.after = page.after
        else:
            self.after = None
            self.alone |= missing
        return found
