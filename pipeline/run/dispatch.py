"""The middle of a run at `--tier sync` (the default): requests sent now, as the reader
reads them. The batch tier's middle is `pipeline.batch.dispatch`.

outer task group
├── writer.consume        outcomes -> OUT/*  (outlives the work, so nothing paid is lost)
├── writer.sync_forever   fsync + index checkpoint every second
├── LiveReport.follow     OUT/report.html while the run goes (see run.live)
├── progress.tick         the bar or the log lines
├── host.watch            1st SIGINT/SIGTERM (or the Ray driver): stop dispatching; 2nd: cancel
└── work scope            (cancelled at the end of the grace period, or at once)
    └── task group
        ├── reader.feed   input -> [grouping: lines of a long prefix held, see run.grouping]
        │                 -> [bounded requests stream]; bad lines -> writer
        └── N x Worker.run
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from pipeline.job import Outcome, Request
from pipeline.quote import quote
from pipeline.run.control import READ_AHEAD_BYTES, Aside, Crew, Refill
from pipeline.run.grouping import HOLD, Grouping
from pipeline.run.live import LiveReport
from pipeline.send.client import Client
from pipeline.send.worker import Worker

if TYPE_CHECKING:
    from pipeline.run.runner import Run


async def dispatch_requests(run: Run, client: Client) -> None:
    """The synchronous middle: the reader feeds the workers, each request sent and judged now."""
    settings, control, writer = run.settings, run.control, run.writer
    attempts = run.attempts(client)
    judge = attempts.judge
    worker = Worker(
        attempts,
        fill_ahead=run.parser.template is not None and run.parser.template.local_images,
        # As many set aside as the read-ahead holds: a model paced slowly holds at most so
        # many more requests in memory.
        aside=Aside(run.gate.crowded, max(2 * settings.concurrency, 16)),
    )
    size = max(2 * settings.concurrency, 16)
    refill = Refill(size // 2)
    requests_send, requests_recv = anyio.create_memory_object_stream[Request](size)
    grouping = None
    if run.parser.prefixes:
        # The hold is the read-ahead window lines of a prefix gather in: many lines, its bytes
        # bounded as the workers' buffer's are. The next prefix leads once fewer lines are left
        # to take than the pool takes in a round trip.
        grouping = worker.grouping = Grouping(
            most=max(HOLD, 16 * settings.concurrency),
            max_bytes=READ_AHEAD_BYTES,
            ahead=settings.concurrency,
        )
        grouping.offer = partial(_offer, requests_send, refill)
        grouping.idle = lambda: requests_send.statistics().tasks_waiting_receive
    # Room for two of the writer's turns: at 0 ms answers, with room for one, 15 % of the
    # outcomes found it full and their workers waited for the writer (a trip round the
    # loop and an event each).
    outcomes_send, outcomes_recv = anyio.create_memory_object_stream[Outcome](2 * size)
    async with anyio.create_task_group() as outer:
        outer.start_soon(writer.consume, outcomes_recv)
        outer.start_soon(writer.sync_forever)
        outer.start_soon(LiveReport(run).follow)
        outer.start_soon(run.progress.tick)
        outer.start_soon(run.host.watch, control, run.progress)
        outer.start_soon(run._count_total)
        run.gate.scopes.start(outer.start_soon)  # a shared pace keeps in step with its store
        with anyio.CancelScope() as work_scope:
            control.work_scope = work_scope
            async with anyio.create_task_group() as tg:
                tg.start_soon(run._read, requests_send, outcomes_send.clone(), refill, grouping)
                # Twice as many workers as requests may be in flight, the crew keeping only
                # --concurrency of them active: a worker waiting out a retry's backoff
                # steps aside for one standing by, so no connection sits idle.
                crew = Crew(settings.concurrency)
                # Stopping wakes whatever waits to send, so that it finds out at once.
                # (A budget's wait for a model's cost ends with the request that learns it,
                # which is in flight or in a backoff that stopping ends too.)
                control.on_stop += [crew.wake_all, run.gate.wake_all, judge.not_found.wake_all]
                if grouping is not None:
                    control.on_stop.append(grouping.stop)
                for _ in range(2 * settings.concurrency):
                    tg.start_soon(worker.run, requests_recv.clone(), outcomes_send.clone(), crew, refill)
                requests_recv.close()
                outcomes_send.close()
        _unnamed_limits(run)
        # Everything that will be written has been sent: let the writer drain, then stop.
        await writer.drained.wait()
        outer.cancel_scope.cancel()


def _offer(requests: MemoryObjectSendStream[Request], refill: Refill, request: Request) -> bool:
    """Hand `request` to a worker waiting for one, if one is, or into the buffer while it is
    empty (else it waits in the grouping's `ready`, which workers look at first). A worker about
    to wait is not yet counted as waiting: the stream's `receive` yields once before it looks
    at the buffer and waits, and a line put into `ready` meanwhile was left there with every
    worker waiting on an empty buffer (a run whose prefixes' answers all came from the answer
    cache stopped for good, 63 lines of 300 done)."""
    stats = requests.statistics()
    if not stats.tasks_waiting_receive and stats.current_buffer_used:
        return False
    try:
        requests.send_nowait(request)
    except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
        return False
    refill.put(len(request.payload))
    return True


def _unnamed_limits(run: Run) -> None:
    """A model's limit given for a model no line of a whole run named is most likely
    misspelled, and the model meant went unpaced: say so."""
    seen, counts = run.gate.scopes.tags, run.counts
    unnamed = [model for model in run.settings.limits if model not in seen]
    if unnamed and counts.finished and run.control.dispatching and counts.read > counts.skipped:
        names = ", ".join(f"[limits.{quote(model)}]" for model in unnamed)
        models = ", ".join(quote(model) for model in list(seen)[:5])
        run.progress.say(
            f"pipeline: {names}: no line of this run named that model (the lines named {models}"
            f"{', ...' if len(seen) > 5 else ''}); is its name spelled as the lines spell it?"
        )
