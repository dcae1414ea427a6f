"""A worker takes requests one at a time, from the reader's stream or from those set aside
while their model's pace is full, takes a seat in the crew (--concurrency of them active), has
each turned into exactly one outcome (`pipeline.send.attempts`), and hands it to the writer.
Lines that share a long prefix come held back by `run.grouping`, released by their kin's
answers into its `ready`, taken before the stream's.
A request the run abandoned (interrupted, key rejected, budget reached) produces nothing and
stays to do for the next run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from pipeline.job import Failure, Outcome, Request, Success
from pipeline.run.control import READ_AHEAD_BYTES, Aside, Crew, Refill, Seat
from pipeline.send.attempts import Attempts

if TYPE_CHECKING:
    from pipeline.run.grouping import Grouping


class Worker:
    def __init__(self, attempts: Attempts, *, aside: Aside, fill_ahead: bool = False) -> None:
        self.attempts = attempts  # one request to its outcome
        self.process = attempts.process
        self.control = attempts.control
        self.fill_ahead = fill_ahead  # the job has local images: fill them before a seat
        self._ahead = 0  # bytes of images filled ahead, their workers waiting for a seat
        self.aside = aside  # requests of a model waiting for its pace
        self.grouping: Grouping | None = None  # lines held to go with their kin (a long prefix)

    async def run(
        self,
        requests: MemoryObjectReceiveStream[Request],
        outcomes: MemoryObjectSendStream[Outcome],
        crew: Crew,
        refill: Refill | None = None,
    ) -> None:
        seat = Seat(crew, self.control)
        # The *_nowait calls skip a trip round the event loop when there is no need to
        # wait; the awaiting calls are there for when there is.
        async with requests, outcomes:
            try:
                if not self.fill_ahead:
                    await seat.take()
                while self.control.dispatching:
                    if self.fill_ahead:
                        seat.give_up()  # seats go to workers whose next request is ready
                    elif seat.crew.crowded:
                        await seat.make_room()
                    request = self._take(requests, refill) or await self._next(requests, refill)
                    if request is None:
                        break
                    outcome: Outcome | None
                    if self.fill_ahead:
                        outcome = await self._ready(request, seat)
                    else:
                        outcome = await self.process(request, seat)
                    if request.prefix is not None and self.grouping is not None:
                        if isinstance(outcome, Success):
                            self.grouping.done(request, failed=False, reused=outcome.reused)
                        else:
                            self.grouping.done(request, failed=True)
                    request.payload = b""  # sent for good: let a big body (images) go
                    if outcome is None:
                        continue
                    try:
                        outcomes.send_nowait(outcome)
                    except anyio.WouldBlock:
                        # Paid for: the writer must get it even if the run is being cancelled.
                        with anyio.CancelScope(shield=True):
                            await outcomes.send(outcome)
            finally:
                seat.give_up()

    def _take(self, requests: MemoryObjectReceiveStream[Request], refill: Refill | None) -> Request | None:
        """The stream's next request, when one is waiting there and none is set aside, as for
        most requests: taken without a coroutine made and awaited (`_next`'s first step, and
        None where `_next` must go on)."""
        if self.aside.held:
            return None
        grouping = self.grouping
        if grouping is not None and grouping.ready:
            request = grouping.take()  # (released by its kin's answer: first in line)
            return None if self.aside.keep(request) else request
        try:
            request = requests.receive_nowait()
        except (anyio.WouldBlock, anyio.EndOfStream):
            return None
        if refill is not None:
            refill.taken(len(request.payload))
        return None if self.aside.keep(request) else request

    async def _next(
        self, requests: MemoryObjectReceiveStream[Request], refill: Refill | None
    ) -> Request | None:
        """The next request to work on (None: there are no more). One set aside whose model
        has room now comes first; else the stream's next, set aside in turn when its model
        has enough requests waiting for its pace; else, with nothing new to take, one set
        aside all the same."""
        aside, grouping = self.aside, self.grouping
        while True:
            if aside.held:
                request = aside.ready()
                if request is not None:
                    return request
            if grouping is not None and grouping.ready:
                request = grouping.take()
                if not aside.keep(request):
                    return request
                continue
            try:
                request = requests.receive_nowait()
            except anyio.WouldBlock:
                request = aside.ready(any_model=True)
                if request is not None:
                    return request
                if grouping is not None and grouping.more():
                    continue  # a key's turn began rather than this worker waiting
                try:
                    request = await requests.receive()
                except anyio.EndOfStream:
                    return aside.ready(any_model=True)
            except anyio.EndOfStream:
                return aside.ready(any_model=True)
            if refill is not None:
                refill.taken(len(request.payload))
            if not aside.keep(request):
                return request

    async def _ready(self, request: Request, seat: Seat) -> Outcome | None:
        """A request with local images is filled before its worker takes a seat, so that
        reading and resizing them overlap the requests in flight instead of adding to their
        time; as many bytes of them wait ahead as the read-ahead allows."""
        size = 0
        failure: Failure | None = None
        if request.images is not None:
            size = sum(image.size for image in request.images)
            if self._ahead == 0 or self._ahead + size <= READ_AHEAD_BYTES:
                self._ahead += size
                failure = await self.attempts.fill(request)
            else:
                size = 0  # filled once seated
        try:
            await seat.take()
        finally:
            self._ahead -= size
        if failure is not None:
            return failure
        return await self.process(request, seat)
