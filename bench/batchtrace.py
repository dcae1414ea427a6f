"""`python -m bench.batchtrace TRACE ARGS...`: `pipeline ARGS...` in this process, as the
`pipeline` command runs it, with the batch tier's steps timed into TRACE (JSON lines, epoch
seconds, written at exit): each submission (and the upload inside it, where the shape
uploads a file), each look at a batch and the status it found (alone, or on a page of the
list of batches), each batch's result lines read, and each batch taken in (`Intake.take`, from its first step to its commit). What the
`batches` scenario splits a run's wall by, from the run's own side of the wire: the mock's
timestamps are whole seconds, as a provider's are.

The timing wraps the batch API the run's host opens and `Intake.take`, a dozen clock reads a
batch and a counter a line: nothing the RSS or the wall would show. Where either seam is
gone (renamed), the run goes on untimed and the trace says why.

BENCH_SAMPLE=1 also samples the process on its CPU timer (SIGPROF, asked for every millisecond
of CPU; the kernel's tick makes it 4 ms at HZ=250) and writes
samples.txt beside TRACE: for the samples taken inside `Intake.take`, each function's share,
inclusive, then its own (time in C, orjson's or SQLite's, is its caller's own). Where the
merge's time goes.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import orjson

Note = Callable[..., None]


class Timed:
    """A `BatchApi` whose calls the run makes are timed; the rest passes through."""

    def __init__(self, api: Any, note: Note) -> None:
        self._api, self._note = api, note
        upload = getattr(api, "_upload", None)
        if upload is not None:  # the files shape: the upload is the part of a submission that grows
            api._upload = self._timed(upload, "upload")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._api, name)

    def _timed(self, call: Callable[..., Any], event: str) -> Callable[..., Any]:
        async def timed(*args: Any, **kwargs: Any) -> Any:
            began = time.time()
            try:
                return await call(*args, **kwargs)
            finally:
                self._note(event=event, began=began, ended=time.time())

        return timed

    async def submit(self, staged: Path, *, tag: str, model: str, lines: int) -> Any:
        began = time.time()
        info = await self._api.submit(staged, tag=tag, model=model, lines=lines)
        self._note(event="submit", id=info.id, lines=lines, began=began, ended=time.time())
        return info

    async def get(self, batch_id: str) -> Any:
        began = time.time()
        info = await self._api.get(batch_id)
        self._note(event="look", id=batch_id, status=info.status, began=began, ended=time.time())
        return info

    async def page(self, after: str | None = None) -> Any:
        """A look at many batches at once: a look at each it shows."""
        began = time.time()
        page = await self._api.page(after)
        ended = time.time()
        for info in page.batches if page is not None else ():
            self._note(event="look", id=info.id, status=info.status, began=began, ended=ended)
        return page

    async def results(self, info: Any) -> AsyncIterator[bytes]:
        began, first, count = time.time(), None, 0
        async for line in self._api.results(info):
            if first is None:
                first = time.time()
            count += 1
            yield line
        self._note(event="results", id=info.id, lines=count, began=began, first=first, ended=time.time())


def _patch(note: Note) -> None:
    from pipeline.batch.intake import Intake
    from pipeline.run.host import Host

    opened = Host.batch_api
    take = Intake.take

    def batch_api(self: Host, settings: Any, api_key: str | None) -> AbstractAsyncContextManager[Any]:
        @asynccontextmanager
        async def timed() -> AsyncIterator[Any]:
            async with opened(self, settings, api_key) as api:
                yield Timed(api, note)

        return timed()

    async def timed_take(self: Intake, batch: Any, info: Any, **how: Any) -> list[int] | None:
        began, cpu = time.time(), time.process_time()
        try:
            return await take(self, batch, info, **how)
        finally:
            ended, cpu = time.time(), time.process_time() - cpu  # (the process's, all threads)
            note(event="take", n=batch.n, id=info.id, status=info.status, began=began, ended=ended, cpu=cpu)

    Host.batch_api = batch_api  # type: ignore[method-assign]
    Intake.take = timed_take  # type: ignore[method-assign]


class Sampler:
    """Which functions the CPU is in while a batch is taken in (see the module's text)."""

    def __init__(self) -> None:
        self.within: Counter[str] = Counter()
        self.own: Counter[str] = Counter()
        self.samples = 0

    def start(self) -> None:
        signal.signal(signal.SIGPROF, self._sample)
        signal.setitimer(signal.ITIMER_PROF, 0.001, 0.001)

    def _sample(self, signum: int, frame: FrameType | None) -> None:
        names: list[str] = []
        while frame is not None:
            code = frame.f_code
            names.append(f"{Path(code.co_filename).name}:{code.co_name}")
            frame = frame.f_back
        if "intake.py:take" not in names:
            return
        self.samples += 1
        self.own[names[0]] += 1
        self.within.update(set(names))

    def write(self, path: Path) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        n = max(self.samples, 1)
        rows = [f"{self.samples} samples in Intake.take", "-- inclusive"]
        rows += [f"{c / n:6.1%} {name}" for name, c in self.within.most_common(50)]
        rows += ["-- own"] + [f"{c / n:6.1%} {name}" for name, c in self.own.most_common(30)]
        path.write_text("\n".join(rows) + "\n")


def main(argv: list[str]) -> int:
    trace, args = Path(argv[0]), argv[1:]
    events: list[dict[str, Any]] = [{"event": "start", "at": time.time()}]

    def note(**event: Any) -> None:
        events.append(event)

    try:
        _patch(note)
    except (ImportError, AttributeError) as e:
        note(event="untimed", why=f"{type(e).__name__}: {e}")
    from pipeline.cli import main as pipeline

    sampler = Sampler() if os.environ.get("BENCH_SAMPLE", "0") != "0" else None
    if sampler is not None:
        sampler.start()
    try:
        return pipeline(args)
    finally:
        note(event="exit", at=time.time())
        trace.write_bytes(b"".join(orjson.dumps(e) + b"\n" for e in events))
        if sampler is not None:
            sampler.write(trace.with_name("samples.txt"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
